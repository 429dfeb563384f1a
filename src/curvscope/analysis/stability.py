"""Stability thresholds of optimizers, the edge of stability, and non-normal update analysis.

Thresholds on a quadratic, the distance to the edge of stability, and the non-normal analysis of the
linearised update.

Every threshold comes from the linearised recursion of :mod:`curvscope.operators.update`: per
eigenvalue mu of P H_c the update acts as the block B(mu) = [[a - g mu, -(b - h mu)], [1, 0]]
with characteristic polynomial z^2 - (a - g mu) z + (b - h mu). By the Jury (Schur-Cohn)
criterion both roots lie inside the unit circle iff |b - h mu| < 1 and
|a - g mu| < 1 + b - h mu. The upper end of the stable interval is where a root crosses -1:
mu < (1 + a + b) / (g + h). With the coefficients of each method this gives, on the
eigenvalues of H_c = H + wd_c I (or of M H_c for Adam):

==========  ===================================================  =============================
method      threshold                                             measured quantity
==========  ===================================================  =============================
gd          2 / eta  - wd_c                                       lambda_max(H)
heavy_ball  2 (1 + beta) / (eta (1 - dampening))  - wd_c          lambda_max(H)
nesterov    2 (1 + beta) / ((1 + 2 beta) eta)  - wd_c             lambda_max(H)
adam        (1 + beta1)(2 - eta wd_d) / ((1 - beta1) eta)         lambda_max(M^1/2 H_c M^1/2)
==========  ===================================================  =============================

- Nesterov: a = 1 + beta, g = eta (1 + beta), b = beta, h = eta beta; the root crosses -1 at
  eta lambda = 2 (1 + beta) / (1 + 2 beta) (and |b - h mu| = beta / (1 + 2 beta) < 1 there).
- Adam (frozen M, bias correction of m at its limit 1): heavy-ball with momentum beta1,
  learning rate eta (1 - beta1) and curvature M H_c, hence 2 (1 + beta1) / ((1 - beta1) eta)
  without decoupled weight decay: the "(2 + 2 beta1) / ((1 - beta1) eta)" of Cohen et al. 2022,
  "Adaptive gradient methods at the edge of stability". AdamW's decay wd_d lowers it by the
  factor (2 - eta wd_d) / 2. lambda_max(M^1/2 H_c M^1/2) = lambda_max(M H_c) (similar
  matrices); coupled weight decay (Adam's, SGD's) is part of H_c, so for SGD it is subtracted
  from the threshold on lambda_max(H).

The tests check each closed form against a scan of the block's spectral radius and against
the actual recursion (torch.optim.SGD for gd, heavy-ball and Nesterov).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..linalg.eigs import top_eigenpairs
from ..linalg.interface import LinearOperatorLike, as_operator
from ..linalg.nonnormal import TransientBounds, transient_bounds
from ..operators.update import (
    OptimizerConfig,
    UpdateOperator,
    heavy_ball_block,
    update_block,
)


def stability_threshold(config: OptimizerConfig) -> float:
    """The largest sharpness at which the linearised update is still stable.

    See the table in the module docstring for the formula and for which sharpness it bounds.

    Args:
        config: Optimizer hyper-parameters (:func:`~curvscope.operators.update.optimizer_config`).

    Returns:
        The threshold, in units of the Hessian's eigenvalues (1 / lr).
    """
    eta, beta = config.lr, config.momentum
    wd_c = config.coupled_weight_decay
    if config.method == "gd":
        return 2.0 / eta - wd_c
    if config.method == "heavy_ball":
        return 2.0 * (1.0 + beta) / (eta * (1.0 - config.dampening)) - wd_c
    if config.method == "nesterov":
        return 2.0 * (1.0 + beta) / ((1.0 + 2.0 * beta) * eta) - wd_c
    return (1.0 + beta) * (2.0 - eta * config.decoupled_decay) / ((1.0 - beta) * eta)


class _PreconditionedHessian:
    """S = M^1/2 (H + wd I) M^1/2 for a positive diagonal M.

    Symmetric, with the same spectrum as M (H + wd I).
    """

    def __init__(self, hessian: LinearOperatorLike, m_diag: Any, weight_decay: float) -> None:
        self.hessian = hessian
        self.shape = hessian.shape
        self.dtype = hessian.dtype
        self.device = torch.device(hessian.device)
        m = torch.as_tensor(np.asarray(m_diag, dtype=np.float64))
        if m.shape != (self.shape[0],):
            raise ValueError(
                f"the preconditioner must be the diagonal of shape (n={self.shape[0]},), got "
                f"{tuple(m.shape)}: are v_hat and the Hessian over the same parameters?"
            )
        if torch.any(m <= 0):
            raise ValueError("the preconditioner's diagonal must be positive")
        self.root = m.sqrt().to(self.device, self.dtype)[:, None]
        self.weight_decay = float(weight_decay)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        W = self.root * V
        out = self.hessian.matmat(W)
        if self.weight_decay:
            out = out + self.weight_decay * W
        return self.root * out


def _top(
    op: Any, k: int, tol: float, seed: int, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """k largest eigenpairs (values (k,), vectors (n, k)) of a symmetric operator."""
    n = op.shape[0]
    if k >= n - 1:
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        dense = op.matmat(eye).to(torch.float64).cpu().numpy()
        values, vectors = np.linalg.eigh((dense + dense.T) / 2)
        order = np.argsort(-values)[:k]
        return values[order], vectors[:, order]
    pairs = top_eigenpairs(op, k=k, which="largest", tol=tol, seed=seed, method=method)
    return np.asarray(pairs.values), np.asarray(pairs.vectors)


def preconditioned_sharpness(
    hessian: LinearOperatorLike | torch.Tensor | np.ndarray,
    m_diag: Any,
    weight_decay: float = 0.0,
    tol: float = 1e-8,
    seed: int = 0,
) -> float:
    """lambda_max(M^1/2 (H + wd I) M^1/2) = lambda_max(M (H + wd I)): Adam's sharpness.

    Args:
        hessian: Symmetric H (n, n), operator or dense matrix.
        m_diag: Diagonal of M = 1 / (sqrt(v_hat) + eps), shape (n,), positive
            (``config.preconditioner()``).
        weight_decay: Coupled weight decay wd_c (Adam's, not AdamW's).
        tol: Relative residual of the eigenpair (:func:`~curvscope.linalg.top_eigenpairs`).
        seed: Start-vector seed.
    """
    op = _PreconditionedHessian(as_operator(hessian), m_diag, weight_decay)
    return float(_top(op, 1, tol, seed)[0][0])


def sharpness(
    hessian: LinearOperatorLike | torch.Tensor | np.ndarray,
    config: OptimizerConfig,
    tol: float = 1e-8,
    seed: int = 0,
) -> float:
    """The sharpness that :func:`stability_threshold` bounds.

    lambda_max(H) for SGD methods, the preconditioned sharpness lambda_max(M^1/2 H_c M^1/2) for
    Adam.
    """
    hessian = as_operator(hessian)
    if config.method == "adam":
        return preconditioned_sharpness(
            hessian, config.preconditioner(), config.coupled_weight_decay, tol, seed
        )
    return float(_top(hessian, 1, tol, seed)[0][0])


@dataclass(frozen=True)
class EdgeDistance:
    """Where a sharpness sits relative to its stability threshold.

    Attributes:
        sharpness: The measured sharpness.
        threshold: The optimizer's threshold on it.
        ratio: sharpness / threshold (1 at the edge of stability, > 1 beyond).
        gap: threshold - sharpness (> 0 on the stable side), in eigenvalue units.
    """

    sharpness: float
    threshold: float
    ratio: float
    gap: float


def edge_distance(sharpness: float, threshold: float) -> EdgeDistance:
    """sharpness / threshold and threshold - sharpness."""
    if not threshold > 0:
        raise ValueError(
            f"the threshold must be > 0, got {threshold}: is the weight decay larger than "
            "the threshold itself?"
        )
    sharpness, threshold = float(sharpness), float(threshold)
    return EdgeDistance(sharpness, threshold, sharpness / threshold, threshold - sharpness)


def edge_of_stability(
    hessian: LinearOperatorLike | torch.Tensor | np.ndarray,
    config: OptimizerConfig,
    tol: float = 1e-8,
    seed: int = 0,
) -> EdgeDistance:
    """The sharpness of ``config``'s kind measured on ``hessian`` against its threshold."""
    return edge_distance(sharpness(hessian, config, tol, seed), stability_threshold(config))


def _companion_roots(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of z^2 - p z - q (the eigenvalues of [[p, q], [1, 0]])."""
    root = np.sqrt(p.astype(complex) ** 2 + 4 * q)
    return (p + root) / 2, (p - root) / 2


def _companion_kappa(z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """kappa(V) of [[p, q], [1, 0]] whose eigenvectors are (z_i, 1).

    With unit columns at angle phi, V^H V = [[1, c], [c*, 1]] has eigenvalues 1 +- |c|, so
    kappa = sqrt((1 + |c|) / (1 - |c|)), |c| = |z1 conj(z2) + 1| / sqrt((|z1|^2+1)(|z2|^2+1)).
    """
    c = np.abs(z1 * np.conj(z2) + 1) / np.sqrt((np.abs(z1) ** 2 + 1) * (np.abs(z2) ** 2 + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.sqrt((1 + c) / (1 - c))
    return np.where(c >= 1 - 1e-15, np.inf, kappa)


@dataclass(frozen=True)
class BlockAnalysis:
    """Per-eigenvalue analysis of the 2 x 2 update blocks.

    Attributes:
        eigenvalues: The eigenvalues analysed (of H, or of M H_c for Adam), shape (m,).
        spectral_radius: Spectral radius of each block, (m,).
        kappa: Eigenvector condition number of each block (unit columns), (m,); inf where the
            block is defective.
        stable: The stability verdict per eigenvalue, (m,).
        threshold: Upper end of the stable interval, in eigenvalue units.
        defective: Eigenvalues where the block is defective (double root), those of H_c.
    """

    eigenvalues: np.ndarray
    spectral_radius: np.ndarray
    kappa: np.ndarray
    stable: np.ndarray
    threshold: float
    defective: np.ndarray


def block_analysis(config: OptimizerConfig, eigenvalues: Any) -> BlockAnalysis:
    """Spectral radius, kappa(V) and verdict of ``config``'s block for each eigenvalue.

    ``eigenvalues`` are those of H (SGD methods; the coupled weight decay is added here) or of
    M H_c (Adam). The verdict is spectral radius < 1. Defective points are the mu where the
    discriminant (a - g mu)^2 - 4 (b - h mu) vanishes.
    """
    if config.order != 2:
        raise ValueError(f"block_analysis is for momentum methods, not {config.method!r}")
    lam = np.asarray(eigenvalues, dtype=float).reshape(-1)
    mu = lam + (0.0 if config.method == "adam" else config.coupled_weight_decay)
    blocks = update_block(config, mu)
    z1, z2 = _companion_roots(blocks[:, 0, 0], blocks[:, 0, 1])
    radius = np.maximum(np.abs(z1), np.abs(z2))
    a, g, b, h = config.coefficients()
    # (a - g mu)^2 - 4 (b - h mu) = g^2 mu^2 - (2 a g - 4 h) mu + a^2 - 4 b
    roots = np.roots([g * g, -(2 * a * g - 4 * h), a * a - 4 * b])
    defective = np.sort(roots[np.abs(roots.imag) < 1e-12].real)
    shift = 0.0 if config.method == "adam" else config.coupled_weight_decay
    return BlockAnalysis(
        eigenvalues=lam,
        spectral_radius=radius,
        kappa=_companion_kappa(z1, z2),
        stable=radius < 1,
        threshold=stability_threshold(config),
        defective=defective - shift,
    )


def heavy_ball_analysis(eta: float, beta: float, eigenvalues: Any) -> BlockAnalysis:
    """Heavy-ball's 2 x 2 blocks [[1 + beta - eta lambda, -beta], [1, 0]] per eigenvalue.

    The verdict is the closed form 0 < eta lambda < 2 (1 + beta) (for 0 <= beta < 1); the
    blocks are defective (kappa -> inf) at eta lambda = (1 -+ sqrt(beta))^2, where the two
    real roots merge before turning into a complex pair of modulus sqrt(beta).
    """
    if not 0 <= beta < 1 or not eta > 0:
        raise ValueError(f"need eta > 0 and 0 <= beta < 1, got eta={eta}, beta={beta}")
    lam = np.asarray(eigenvalues, dtype=float).reshape(-1)
    blocks = heavy_ball_block(eta, beta, lam)
    z1, z2 = _companion_roots(blocks[:, 0, 0], blocks[:, 0, 1])
    x = eta * lam
    return BlockAnalysis(
        eigenvalues=lam,
        spectral_radius=np.maximum(np.abs(z1), np.abs(z2)),
        kappa=_companion_kappa(z1, z2),
        stable=(x > 0) & (x < 2 * (1 + beta)),
        threshold=2 * (1 + beta) / eta,
        defective=np.array([(1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2]) / eta,
    )


@dataclass(frozen=True)
class NonnormalReport:
    """Non-normal analysis of an update operator restricted to a small invariant subspace.

    Attributes:
        bounds: :class:`~curvscope.linalg.nonnormal.TransientBounds` of the restriction.
        restricted: The restricted matrix (d, d) in an orthonormal basis of the subspace.
        eigenvalues: The top eigenvalues whose eigenvectors span the subspace (of H_c, or of
            M^1/2 H_c M^1/2 for Adam), shape (k,); empty when a basis was given.
        invariance_residual: ||T Q - Q (Q^T T Q)||_F / ||Q^T T Q||_F: about the eigensolver's
            tolerance when the subspace is invariant, so that powers of the restriction are
            powers of T on it.
    """

    bounds: TransientBounds
    restricted: np.ndarray
    eigenvalues: np.ndarray
    invariance_residual: float


def _apply(T: Any, Q: np.ndarray) -> np.ndarray:
    if isinstance(T, np.ndarray):
        return T @ Q
    block = torch.as_tensor(Q).to(T.device, T.dtype)
    return T.matmat(block).to(torch.float64).cpu().numpy()


def nonnormal_report(
    update: UpdateOperator | torch.Tensor | np.ndarray,
    k_top: int = 4,
    num_steps: int = 200,
    eps: Any = None,
    basis: Any = None,
    tol: float = 1e-10,
    seed: int = 0,
    eigensolver: str = "auto",
    **kwargs: Any,
) -> NonnormalReport:
    """rho, kappa(V), Kreiss bound and measured max ||T^k|| of T on its top eigenspace.

    For an :class:`UpdateOperator` the subspace is spanned by (w_i, 0) and (0, w_i) for the k
    top eigenvectors w_i of P H_c (w = P^1/2 u with u the eigenvectors of the symmetric
    P^1/2 H_c P^1/2; w = u without a preconditioner): it is invariant under T, so the
    restriction is exact. With a dense T and no basis the whole T is analysed.

    Args:
        update: The update operator, or a dense square T.
        k_top: Number of top eigenvectors (the restriction has size order * k_top).
        num_steps: Powers measured (:func:`~curvscope.linalg.nonnormal.transient_bounds`).
        eps: Kreiss eps values (default relative to ||T||).
        basis: Columns (n, k) spanning the analysed subspace of the parameter space (stacked
            as diag(basis, basis) for order-2 operators), instead of the top eigenvectors.
        tol: Eigensolver tolerance.
        seed: Eigensolver start-vector seed.
        eigensolver: ``method`` of :func:`~curvscope.linalg.top_eigenpairs` for the top
            eigenvectors: "auto" (its default), "arpack" or "lanczos" (one Krylov run without
            restarts: about half ARPACK's products for a few eigenpairs at a loose ``tol``,
            the choice when the report is taken at many training steps).
        kwargs: Passed to :func:`~curvscope.linalg.nonnormal.pseudospectral_radius`.
    """
    values = np.zeros(0)
    if isinstance(update, UpdateOperator):
        order, n = update.order, update.n
        if basis is None:
            if update.preconditioner is None:
                sym = _PreconditionedHessian(update.hessian, np.ones(n), update.wd)
                root = np.ones(n)
            else:
                m = update.preconditioner.to(torch.float64).cpu().numpy()
                sym = _PreconditionedHessian(update.hessian, m, update.wd)
                root = np.sqrt(m)
            values, U = _top(sym, k_top, tol, seed, eigensolver)
            basis = root[:, None] * U
        T: Any = update
    else:
        T = update.detach().cpu().numpy() if isinstance(update, torch.Tensor) else update
        T = np.asarray(T, dtype=float)
        size = T.shape[0]
        if basis is None:
            basis = np.eye(size)
        order = 2 if np.asarray(basis).shape[0] * 2 == size else 1
        n = size // order
    basis = np.asarray(basis, dtype=float)
    if basis.ndim != 2 or basis.shape[0] != n:
        raise ValueError(f"basis must have shape (n={n}, k), got {basis.shape}")
    if order == 2:
        zero = np.zeros_like(basis)
        basis = np.block([[basis, zero], [zero, basis]])
    Q, _ = np.linalg.qr(basis)
    TQ = _apply(T, Q)
    restricted = Q.T @ TQ
    residual = np.linalg.norm(TQ - Q @ restricted) / max(np.linalg.norm(restricted), 1e-300)
    bounds = transient_bounds(restricted, num_steps=num_steps, eps=eps, **kwargs)
    return NonnormalReport(bounds, restricted, values, float(residual))
