"""The stochastic edge of stability of SGD (Agarwala & Pennington 2024, arXiv:2404.19261).

**Source.** The paper's full text was not available to us; what we could read (its abstract
and a summary of it) states that a second-moment analysis of SGD on a high-dimensional
linearised model gives, besides the deterministic edge eta lambda_max < 2, a *stochastic* edge
of stability at small batch sizes, at "noise kernel norm" K = 1, which is sensitive to the
trace of the NTK rather than to the top Hessian eigenvalues. The definition below is
re-derived in that setting (one output per sample, squared loss, mini-batches of B of the N
training samples); the paper's equation numbers could not be checked. Equations (1)-(6) are
this module's.

**Setting.** N samples with one output f_i each, the mean loss L = (1/N) sum_i l(f_i, y_i)
with l = (c/2) (f - y)^2 (c = 1 for half the squared error, c = 2 for ``F.mse_loss``), the
linearised model f(theta) = f(theta_0) + J (theta - theta_0) with J = d f / d theta of shape
(N, n). The Gauss-Newton matrix G = (c/N) J^T J, shape (n, n), is the Hessian of the linear
model; its nonzero eigenvalues lambda_a are those of Theta = (c/N) J J^T, shape (N, N), the
NTK J J^T scaled by c/N. One SGD step theta' = theta - eta grad L_S on the mean loss L_S of a
batch S of B samples moves the residuals z = f - y (shape (N,)) by

    (1)  z' = (I - eta Theta M_S) z,    M_S = (N / B) P_S,    E[M_S] = I,

with P_S the diagonal 0/1 selection of S. Averaged over batches, the second moment
Z = E[z z^T] (shape (N, N)) follows exactly

    (2)  Z' = (I - eta Theta) Z (I - eta Theta)
              + gamma eta^2 [N Theta diag(Z) Theta - Theta Z Theta],

    gamma = (N - B) / (B (N - 1))   S a uniformly random B-subset (without replacement),
    gamma = 1 / B                   B indices drawn independently (with replacement).

(E[M Z M] = (1 - gamma) Z + gamma N diag(Z).) **Closure** (the high-dimensional
approximation): the residual's energy is spread evenly over the samples, N diag(Z) ~ tr(Z) I.
It is exact at the fixed point when the samples are exchangeable under Theta's symmetries
(a circulant Theta; the tests check this against the exact map (2)). In Theta's eigenbasis,
with m_a = v_a^T Z v_a,

    (3)  m_a' = d_a m_a + gamma eta^2 lambda_a^2 sum_b m_b,
         d_a = (1 - eta lambda_a)^2 - gamma eta^2 lambda_a^2 = 1 - 2 x_a + (1 - gamma) x_a^2,

x_a = eta lambda_a. A diagonal plus a rank-one coupling with positive weights, similar to a
symmetric matrix (so its eigenvalues are real and interlace the d_a): the largest eigenvalue
is below 1 iff every d_a < 1 and

    (4)  K = gamma eta^2 sum_a lambda_a^2 / (1 - d_a)
           = gamma eta sum_a lambda_a / (2 - (1 - gamma) eta lambda_a)  <  1.

(The smallest can fall below -1 for B <= 2, an artifact of the closure: the exact map (2) is
positive, so its spectral radius is its largest eigenvalue; see (6).) The per-mode condition
d_a < 1 reads

    (5)  x_a < x_mode = 2 / (1 - gamma)    (no limit at gamma = 1, i.e. B = 1).

For eta lambda_a << 1, K ~ gamma eta tr(Theta) / 2 = gamma eta c tr(J J^T) / (2 N), about
eta c tr(NTK) / (2 B N) for B << N: the NTK trace, not lambda_max, sets this edge. At full
batch (B = N, gamma = 0) K = 0 and only the deterministic edge eta lambda_max < 2 remains.

**Without the closure: the noise kernel.** For a given Theta = V diag(lambda) V^T, the noise
source of (2) is D = N diag(Z) (a vector of N); given D, (2)'s stationary Z is entrywise in
Theta's eigenbasis, and D must reproduce itself, D = Q D, with the N x N noise kernel

    (6)  Q D = N gamma eta^2 diag(V [W o (V^T diag(D) V)] V^T),
         W_ab = lambda_a lambda_b / (x_a + x_b - (1 - gamma) x_a x_b)

(o the entrywise product). Q is symmetric, and positive semi-definite when every
x_a < 2 / (1 - gamma) (then W >= 0). The map (2) is positive (an average of Z -> A Z A^T), so
its spectral radius is an eigenvalue with a PSD eigenvector, and the second moment contracts
iff every d_a < 1 and ||Q|| < 1 (||Q|| its largest eigenvalue; :func:`kernel_norm`). K (4)
is Q's Rayleigh quotient at the flat vector, K = 1^T Q 1 / N <= ||Q||: the closure says Q's
top eigenvector is flat, which is exact for exchangeable samples and approached when no
sample's NTK row stands out. So K (4) is the high-dimensional value of the noise kernel norm
||Q|| and never exceeds it. Both statements are tested against the map (2) with every batch
enumerated.

**Several outputs per sample are refused.** With C > 1 outputs a batch selects C x C blocks,
(2) holds with N Theta bdiag(Z) Theta, and a closure must say how the residual's second moment
is shared between a sample's outputs: isotropy (N bdiag(Z) ~ (tr Z / C) I) gives K / C with K
summed over the N C eigenvalues of Theta. The single-output derivation does not determine
this share, and for one-hot targets with a network's strongly correlated per-output Jacobian
rows isotropy is implausible. :func:`noise_kernel_norm` raises a ValueError for C > 1.

**Estimating K.** :func:`noise_kernel_norm` takes the lambda_a from G of the model, loss and
training data. "exact" forms the per-sample Jacobian and the N x N (or n x n) Gram matrix
(standard error 0), and from Theta also ||Q|| (6). "slq" deflates the top-k eigenpairs of the
Gauss-Newton operator (:func:`~curvscope.linalg.top_eigenpairs`), whose terms enter exactly,
and estimates the rest of the spectral sum by stochastic Lanczos quadrature on the deflated
operator: each probe's quadrature is one unbiased (to the quadrature error) estimate, and the
standard error is their standard deviation over sqrt(probes).
:func:`stochastic_edge_from_density` does the same with a density already measured (of the
Hessian: near interpolation H ~ G).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from ..distributed import is_distributed
from ..linalg.density import SpectralDensity
from ..linalg.eigs import top_eigenpairs
from ..linalg.slq import spectral_density
from ..operators.autodiff import RowBackward, resolve_mode
from ..operators.batches import DataSource, UnpackBatch
from ..operators.dataset_operator import LossFn
from ..operators.functional import ModelFunction, ParamSpec, preserved_rng, random_modules
from ..operators.ggn import GGNOperator

#: Largest N for which :func:`noise_kernel_norm` also computes ||Q|| (6) by default.
KERNEL_MAX_SAMPLES = 2048


@dataclass(frozen=True)
class StochasticEdge:
    """Where SGD's second moment stands, by the noise kernel norm (4).

    Attributes:
        K: The noise kernel norm (4); inf when some mode has (1 - gamma) eta lambda >= 2.
        max_diagonal: (1 - gamma) eta lambda_max / 2 = eta lambda_max / x_mode (5): below 1
            for every d_a < 1.
        stable: K < 1 and max_diagonal < 1.
        K_trace: The small-eta form gamma eta tr(G) / 2.
        K_std_error: Standard error of K (0 when every eigenvalue entered exactly).
        K_trace_std_error: Standard error of K_trace.
        gamma: The batch-noise factor of (2).
        kernel_norm: ||Q|| of (6), the exact mean-square edge of the linearised model (>= K;
            nan unless the N x N NTK Gram matrix was formed: method "exact").
        meta: How K was computed (method, N, probes, deflated pairs, wall time, ...).
    """

    K: float
    max_diagonal: float
    stable: bool
    K_trace: float
    K_std_error: float = 0.0
    K_trace_std_error: float = 0.0
    gamma: float = float("nan")
    kernel_norm: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)


def noise_factor(
    batch_size: int, num_samples: int | None = None, replacement: bool = False
) -> float:
    """gamma of (2), the factor of the minibatch noise.

    (N - B) / (B (N - 1)) for batches drawn without replacement, 1/B with replacement or for
    N = None (N -> infinity).
    """
    _check_batch(batch_size, num_samples)
    if replacement or num_samples is None:
        return 1.0 / batch_size
    if num_samples == 1:
        return 0.0
    return (num_samples - batch_size) / (batch_size * (num_samples - 1.0))


def mode_limit(gamma: float) -> float:
    """x_mode of (5): d_a < 1 iff eta lambda_a < x_mode (inf for gamma = 1)."""
    return 2.0 / (1.0 - gamma) if gamma < 1.0 else float("inf")


def _kernel_terms(lam: np.ndarray, eta: float, gamma: float) -> np.ndarray:
    """gamma eta lambda / (2 - (1 - gamma) eta lambda) per eigenvalue: the terms of (4)."""
    return gamma * eta * lam / (2.0 - (1.0 - gamma) * eta * lam)


def _edge(
    K: float,
    K_se: float,
    K_trace: float,
    K_trace_se: float,
    lambda_max: float,
    eta: float,
    gamma: float,
    meta: dict[str, Any],
) -> StochasticEdge:
    max_diagonal = (1.0 - gamma) * max(eta * lambda_max, 0.0) / 2.0
    if (1.0 - gamma) * eta * lambda_max >= 2.0:
        K, K_se = float("inf"), float("nan")
    return StochasticEdge(
        K=float(K),
        max_diagonal=float(max_diagonal),
        stable=bool(K < 1.0 and max_diagonal < 1.0),
        K_trace=float(K_trace),
        K_std_error=float(K_se),
        K_trace_std_error=float(K_trace_se),
        gamma=float(gamma),
        meta=meta,
    )


def stochastic_edge(
    eigenvalues: np.ndarray,
    eta: float,
    batch_size: int,
    num_samples: int | None = None,
    replacement: bool = False,
) -> StochasticEdge:
    """K (4) from the eigenvalues of G (or of Theta = (c/N) J J^T: the same nonzero ones).

    Args:
        eigenvalues: All eigenvalues lambda_a, shape (m,); zeros may be left out (they add 0).
        eta: SGD's learning rate on the mean loss whose Gauss-Newton matrix G is.
        batch_size: B.
        num_samples: N, the training samples SGD draws from; None for N -> infinity.
        replacement: Whether a batch's B samples are drawn with replacement (default: a
            B-subset, as a shuffling DataLoader gives).

    Returns:
        :class:`StochasticEdge` with standard errors 0 (the sum is exact).
    """
    _check(eta, batch_size, num_samples)
    gamma = noise_factor(batch_size, num_samples, replacement)
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    lambda_max = float(lam.max()) if lam.size else 0.0
    meta = {"method": "eigenvalues", "num_samples": num_samples, "replacement": replacement}
    K = float(np.sum(_kernel_terms(lam, eta, gamma)))
    K_trace = gamma * eta * float(lam.sum()) / 2.0
    return _edge(K, 0.0, K_trace, 0.0, lambda_max, eta, gamma, meta)


def _probe_sums(density: SpectralDensity, f) -> np.ndarray:
    """n sum_i w_{p,i} f(node_{p,i}) per probe p: one estimate of tr f(A) per probe."""
    nodes = np.where(np.isfinite(density.nodes), density.nodes, 0.0)
    return density.n * np.sum(density.weights * f(nodes), axis=1)


def _mean_se(samples: np.ndarray) -> tuple[float, float]:
    if samples.size < 2:
        return float(samples.mean()), float("nan")
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(samples.size))


def stochastic_edge_from_density(
    density: SpectralDensity,
    eta: float,
    batch_size: int,
    num_samples: int | None = None,
    replacement: bool = False,
    exact_eigenvalues: np.ndarray | None = None,
) -> StochasticEdge:
    """K (4) from an SLQ density, with the standard error of its probes.

    Each probe p gives the unbiased (up to quadrature error) estimate
    s_p = n sum_i w_{p,i} f(node_{p,i}) of tr f(A); K = mean_p s_p (+ the exact terms of
    ``exact_eigenvalues``) and its standard error is std_p(s_p) / sqrt(P).

    Args:
        density: SLQ of G (or of the Hessian near interpolation, where H ~ G); when
            ``exact_eigenvalues`` is given, of the operator with those eigenpairs deflated.
        eta: SGD's learning rate, as for :func:`stochastic_edge`.
        batch_size: B.
        num_samples: N, the training samples SGD draws from; None for N -> infinity.
        replacement: Whether a batch's B samples are drawn with replacement.
        exact_eigenvalues: Eigenvalues deflated from the density's operator (shape (k,)),
            whose terms enter exactly.

    Negative Ritz values (a Hessian's) enter as they are; the theory assumes lambda >= 0, so
    read K as a diagnostic there.
    """
    _check(eta, batch_size, num_samples)
    gamma = noise_factor(batch_size, num_samples, replacement)
    exact = np.zeros(0) if exact_eigenvalues is None else np.asarray(exact_eigenvalues, float)
    lambda_max = max(density.lambda_max, float(exact.max()) if exact.size else -np.inf)
    meta = {
        "method": "slq" if exact.size else "density",
        "num_samples": num_samples,
        "replacement": replacement,
        "num_probes": density.num_probes,
        "num_iters": int(density.nodes.shape[1]),
        "num_deflated": int(exact.size),
    }
    trace, trace_se = _mean_se(_probe_sums(density, lambda lam: lam))
    trace += float(exact.sum())
    K, K_se = float("inf"), float("nan")
    if (1.0 - gamma) * eta * lambda_max < 2.0:
        K, K_se = _mean_se(_probe_sums(density, lambda lam: _kernel_terms(lam, eta, gamma)))
        K += float(np.sum(_kernel_terms(exact, eta, gamma)))
    scale = gamma * eta / 2.0
    return _edge(K, K_se, scale * trace, scale * trace_se, lambda_max, eta, gamma, meta)


def critical_learning_rate(
    eigenvalues: np.ndarray,
    batch_size: int,
    num_samples: int | None = None,
    replacement: bool = False,
    target: float = 1.0,
) -> float:
    """The learning rate at which K (4) reaches ``target`` (1: the stochastic edge).

    Capped at the per-mode bound x_mode / lambda_max of (5); K grows with eta, so the root is
    unique.
    """
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    gamma = noise_factor(batch_size, num_samples, replacement)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    lam = lam[lam > 0]
    if lam.size == 0:
        return float("inf")
    mode_bound = mode_limit(gamma) / lam.max()
    if gamma == 0.0:
        return float(mode_bound)

    def excess(eta: float) -> float:
        return float(np.sum(_kernel_terms(lam, eta, gamma))) - target

    # Every term is at least gamma eta lambda / 2, so K >= target there.
    upper = min(mode_bound * (1.0 - 1e-12), 2.0 * target / (gamma * lam.sum()))
    if excess(upper) < 0:
        return float(mode_bound)
    return float(brentq(excess, 0.0, upper, xtol=1e-14 * upper, rtol=1e-12))


def gauss_newton_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    unpack_batch: UnpackBatch | None = None,
    chunk: int = 256,
    max_bytes: int = 1 << 30,
) -> tuple[np.ndarray, int]:
    """All eigenvalues of the Gauss-Newton matrix G of a one-output model, exactly.

    G = (1/N) sum_b |b| J_b^T H_b J_b with H_b = d^2 L_b / d outputs_b^2 the Hessian of the
    batch's mean loss in its outputs, diagonal for a loss that is a mean over samples:
    G = J~^T J~ with rows J~_i = sqrt(|b| h_i / N) J_i (for ``F.mse_loss``, |b| h_i = 2 and
    G = (2/N) J^T J). The rows J_i come from one backward pass each (in blocks of ``chunk``);
    the eigenvalues from the smaller Gram matrix J~ J~^T (N x N, = Theta) or J~^T J~ (n x n).

    Args:
        model: ``nn.Module`` returning one tensor whose first dimension is the batch and which
            has one entry per sample; never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss.
        data: Re-iterable of batches: the training set SGD draws from.
        params: Parameters to analyse (names or parameters); default all trainable, as for
            :class:`~curvscope.HessianOperator`.
        dtype: Product dtype; default float64 on CPU, the model's dtype on GPU.
        device: Where the work runs; default the model's device.
        unpack_batch: ``batch -> (inputs, targets)`` for batches that are not pairs.
        chunk: Jacobian rows per backward block.
        max_bytes: Refuse (ValueError) when the N x n Jacobian would need more memory.

    Returns:
        (eigenvalues of shape (min(N, n),), descending; N).
    """
    jac = _scaled_jacobian(
        model, loss_fn, data, params, dtype, device, unpack_batch, chunk, max_bytes
    )
    N, n = jac.shape
    gram = jac @ jac.T if N <= n else jac.T @ jac
    return torch.linalg.eigvalsh(gram).flip(0).cpu().numpy(), N


def ntk_gram(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    unpack_batch: UnpackBatch | None = None,
    chunk: int = 256,
    max_bytes: int = 1 << 30,
) -> np.ndarray:
    """Theta = J~ J~^T of :func:`gauss_newton_eigenvalues`, float64, shape (N, N).

    The NTK J J^T weighted by the loss curvature, (2/N) J J^T for ``F.mse_loss``, in data order.
    """
    jac = _scaled_jacobian(
        model, loss_fn, data, params, dtype, device, unpack_batch, chunk, max_bytes
    )
    return (jac @ jac.T).cpu().numpy()


def _scaled_jacobian(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    params: ParamSpec,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    unpack_batch: UnpackBatch | None,
    chunk: int,
    max_bytes: int,
) -> torch.Tensor:
    """J~ (N, n), float64: row i is sqrt(|b| h_i / N) d f_i / d theta."""
    if is_distributed():
        raise ValueError("the exact Gauss-Newton spectrum is not distributed: use method='slq'")
    random = random_modules(model)
    if random:
        raise ValueError(f"modules {random} are random in train mode: call model.eval() first")
    function = ModelFunction(model, params=params, dtype=dtype, device=device)
    source = DataSource(data, function.device, function.dtype, unpack_batch)
    backward = RowBackward(resolve_mode("auto", function.device))
    leaves = function.param_list()
    n = function.num_params
    blocks: list[torch.Tensor] = []
    num_samples = 0
    with preserved_rng(), torch.enable_grad():
        for batch in source:
            outputs = function.outputs(batch)
            check_one_output(outputs, batch.size)
            num_samples += batch.size
            if 8 * num_samples * n > max_bytes:
                raise ValueError(
                    f"the exact spectrum needs the {num_samples}+ x {n} Jacobian, over "
                    f"max_bytes = {max_bytes}: use method='slq'"
                )
            weights = _output_curvature(loss_fn, outputs, batch) * batch.size
            flat = outputs.reshape(-1)
            eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
            rows = torch.empty(flat.numel(), n, dtype=flat.dtype, device=flat.device)
            for start in range(0, flat.numel(), chunk):
                stop = min(start + chunk, flat.numel())
                backward([flat], leaves, [eye[start:stop]], out=rows[start:stop])
            blocks.append(rows.detach() * weights.sqrt()[:, None])
    if num_samples == 0:
        raise ValueError("data yielded no batches")
    return torch.cat(blocks).to(torch.float64) / np.sqrt(num_samples)


def kernel_norm(
    gram: np.ndarray,
    eta: float,
    batch_size: int,
    replacement: bool = False,
    tol: float = 1e-10,
) -> float:
    """||Q||, the largest eigenvalue of the exact noise kernel Q (6) of Theta = ``gram``.

    Mean-square stability of SGD on the linearised model, with no closure: the second moment
    (2) contracts iff every d_a < 1 and ||Q|| < 1. K (4) = 1^T Q 1 / N <= ||Q||.

    Args:
        gram: Theta, shape (N, N), symmetric PSD, over the whole training set
            (:func:`ntk_gram`); N = its size.
        eta: SGD's learning rate, as for :func:`stochastic_edge`.
        batch_size: B.
        replacement: Whether a batch's B samples are drawn with replacement.
        tol: Relative tolerance of the Lanczos iteration (ARPACK) on Q (N > 24).

    Returns:
        ||Q|| (inf when some (1 - gamma) eta lambda_a >= 2). Cost O(N^3) per product of Q.
    """
    theta = np.asarray(gram, dtype=np.float64)
    N = theta.shape[0]
    _check(eta, batch_size, N)
    gamma = noise_factor(batch_size, N, replacement)
    lam, V = np.linalg.eigh((theta + theta.T) / 2)
    lam = np.where(lam > 1e-12 * max(lam.max(), 0.0), lam, 0.0)
    x = eta * lam
    if (1.0 - gamma) * x.max() >= 2.0:
        return float("inf")
    if gamma == 0.0 or x.max() == 0.0:
        return 0.0
    denominator = x[:, None] + x[None, :] - (1.0 - gamma) * np.outer(x, x)
    safe = np.where(denominator > 0, denominator, 1.0)
    W = np.where(denominator > 0, np.outer(lam, lam) / safe, 0.0)
    scale = N * gamma * eta**2

    def apply(D: np.ndarray) -> np.ndarray:
        X = W * ((V * D[:, None]).T @ V)
        return scale * np.sum((V @ X) * V, axis=1)  # diag(V X V^T): two N^3 products

    if N <= 24:
        kernel = np.stack([apply(e) for e in np.eye(N)], axis=1)
        return float(np.linalg.eigvalsh((kernel + kernel.T) / 2).max())
    operator = LinearOperator(
        (N, N), matvec=lambda d: apply(np.asarray(d).reshape(-1)), dtype=float
    )
    start = np.full(N, 1.0 / np.sqrt(N))  # K's vector: near the top one in high dimension
    value = eigsh(operator, k=1, which="LA", tol=tol, v0=start, return_eigenvectors=False)
    return float(value[0])


def noise_kernel_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    eta: float,
    batch_size: int,
    method: Literal["auto", "exact", "slq"] = "auto",
    num_samples: int | None = None,
    replacement: bool = False,
    num_deflate: int = 8,
    num_iters: int = 30,
    num_probes: int = 10,
    seed: int = 0,
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    unpack_batch: UnpackBatch | None = None,
    max_bytes: int = 1 << 28,
    exact_kernel: bool = True,
) -> StochasticEdge:
    """K (4) of SGD on ``model`` with ``loss_fn`` over the training set ``data``.

    Args:
        model: One output per sample (several are refused: see the module docstring).
        loss_fn: The batch mean loss SGD minimises (the derivation is for squared error).
        data: The training set SGD draws its batches from (N samples).
        eta: SGD's learning rate.
        batch_size: B.
        method: "exact" (:func:`gauss_newton_eigenvalues`, standard error 0), "slq" (the top
            ``num_deflate`` eigenpairs of the Gauss-Newton operator exactly, the rest of the
            sum by SLQ with ``num_iters`` x ``num_probes``, standard error over the probes),
            or "auto": exact when the N x n Jacobian fits ``max_bytes``.
        num_samples: N for gamma when ``data`` is not the whole training set; default the
            samples of ``data``.
        replacement: Batches drawn with replacement (default: B-subsets).
        num_deflate: Top eigenpairs of G deflated exactly by "slq".
        num_iters: Lanczos steps per probe of "slq".
        num_probes: Probes of "slq".
        seed: Seed of the deflation's start vector and of the SLQ probes.
        params: Parameters to analyse (names or parameters); default all trainable, as for
            :class:`~curvscope.HessianOperator`.
        dtype: Product dtype; default float64 on CPU, the model's dtype on GPU.
        device: Where the work runs; default the model's device.
        unpack_batch: ``batch -> (inputs, targets)`` for batches that are not pairs.
        max_bytes: "auto" takes "exact" when the N x n float64 Jacobian fits this.
        exact_kernel: With "exact" and N <= :data:`KERNEL_MAX_SAMPLES` (``data`` the whole
            training set), also ||Q|| of (6) (:func:`kernel_norm`: 2 N^3 flops per Lanczos
            step, about 2 s at N = 1,000 on one CPU thread).

    Returns:
        :class:`StochasticEdge` with K, its standard error, ``kernel_norm`` and ``meta``.
    """
    _check(eta, batch_size, num_samples)
    if method not in ("auto", "exact", "slq"):
        raise ValueError(f"method must be 'auto', 'exact' or 'slq', not {method!r}")
    started = time.perf_counter()
    common = {"params": params, "dtype": dtype, "device": device, "unpack_batch": unpack_batch}
    count, n = _shape_of_problem(model, data, **common)
    count = num_samples or count
    _check(eta, batch_size, count)
    if method == "auto":
        method = "exact" if 8 * count * n <= max_bytes else "slq"
    if method == "exact":
        jac = _scaled_jacobian(
            model, loss_fn, data, params, dtype, device, unpack_batch, 256,
            max(max_bytes, 8 * count * n),
        )  # fmt: skip
        rows = jac.shape[0]
        with_kernel = exact_kernel and rows <= KERNEL_MAX_SAMPLES and count == rows
        gram = jac @ jac.T if rows <= n or with_kernel else jac.T @ jac
        values = torch.linalg.eigvalsh(gram).cpu().numpy()
        edge = stochastic_edge(values, eta, batch_size, count, replacement)
        meta = {**edge.meta, "method": "exact"}
        if with_kernel:
            norm = kernel_norm(gram.cpu().numpy(), eta, batch_size, replacement)
            edge = dataclasses.replace(edge, kernel_norm=norm)
    else:
        op = GGNOperator(model, loss_fn, data, **common)
        edge, meta = _slq_edge(
            op, eta, batch_size, count, replacement, num_deflate, num_iters, num_probes, seed
        )
    meta["wall_time_s"] = time.perf_counter() - started
    return dataclasses.replace(edge, meta=meta)


def _slq_edge(
    op: GGNOperator,
    eta: float,
    batch_size: int,
    num_samples: int,
    replacement: bool,
    num_deflate: int,
    num_iters: int,
    num_probes: int,
    seed: int,
) -> tuple[StochasticEdge, dict[str, Any]]:
    n = op.shape[0]
    k = min(int(num_deflate), n - 2)
    exact = np.zeros(0)
    target: Any = op
    meta: dict[str, Any] = {}
    if k > 0:
        pairs = top_eigenpairs(op, k=k, tol=1e-6, seed=seed)
        exact = pairs.values
        target = _Deflated(op, pairs.vectors)
        meta["deflation_residual_max"] = float(np.max(pairs.residuals))
    density = spectral_density(target, num_iters=num_iters, num_probes=num_probes, seed=seed)
    edge = stochastic_edge_from_density(density, eta, batch_size, num_samples, replacement, exact)
    return edge, {**edge.meta, **meta, "method": "slq"}


class _Deflated:
    """P G P with P = I - U U^T: G with its eigenpairs U (n, k) removed (set to 0)."""

    def __init__(self, op: Any, vectors: np.ndarray) -> None:
        self.op = op
        self.shape = op.shape
        self.dtype = op.dtype
        self.device = op.device
        self.U = torch.as_tensor(vectors, dtype=op.dtype, device=op.device)

    def _project(self, V: torch.Tensor) -> torch.Tensor:
        return V - self.U @ (self.U.T @ V)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._project(self.op.matmat(self._project(V)))


def _shape_of_problem(
    model: nn.Module,
    data: Iterable[Any],
    params: ParamSpec,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    unpack_batch: UnpackBatch | None,
) -> tuple[int, int]:
    """(N, n), after checking that the model has one output per sample (on the first batch)."""
    function = ModelFunction(model, params=params, dtype=dtype, device=device)
    source = DataSource(data, function.device, function.dtype, unpack_batch)
    count = 0
    with preserved_rng(), torch.no_grad():
        for batch in source:
            if count == 0:
                check_one_output(function.outputs(batch), batch.size)
            count += batch.size
    if count == 0:
        raise ValueError("data yielded no batches")
    return count, function.num_params


def check_one_output(outputs: Any, size: int | None = None) -> None:
    """Refuse (ValueError) model outputs that are not one tensor with one entry per sample."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
        raise TypeError("the stochastic edge needs a model returning one tensor (batch, ...)")
    if size is not None and outputs.shape[0] != size:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} do not start with the batch size {size}"
        )
    per_sample = outputs[0].numel()
    if per_sample != 1:
        raise ValueError(
            f"the noise kernel norm K is derived for one output per sample; this model has "
            f"{per_sample}. With several outputs the batch noise couples a sample's outputs in "
            "a way the derivation does not determine (see curvscope.analysis.stochastic_edge):"
            " train a one-output model (e.g. scalar regression targets) to measure K"
        )


def _output_curvature(loss_fn: LossFn, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    """Diagonal of d^2 L_b / d outputs^2, shape (|b|,).

    Refuses a loss coupling samples or concave in an output.
    """
    leaf = outputs.detach().requires_grad_(True)
    loss = loss_fn(leaf, batch.targets)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError("loss_fn must return the batch's mean loss as a scalar tensor")
    (gradient,) = torch.autograd.grad(loss, leaf, create_graph=True)
    ones = torch.ones_like(leaf)
    generator = torch.Generator(device="cpu").manual_seed(0)
    signs = (2.0 * torch.randint(0, 2, leaf.shape, generator=generator) - 1.0).to(leaf)
    diagonal, mixed = (
        torch.autograd.grad(gradient, leaf, grad_outputs=v, retain_graph=True)[0]
        for v in (ones, signs)
    )
    diagonal, mixed = diagonal.detach().reshape(-1), mixed.detach().reshape(-1)
    scale = float(diagonal.abs().max()) if diagonal.numel() else 0.0
    if not torch.allclose(mixed, diagonal * signs.reshape(-1), rtol=1e-8, atol=1e-12 * scale):
        raise ValueError("the loss couples samples (its output Hessian is not diagonal)")
    if float(diagonal.min()) < 0:
        raise ValueError("the loss is concave in an output: its Gauss-Newton matrix is not PSD")
    return diagonal


def _check_batch(batch_size: int, num_samples: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if num_samples is not None and num_samples < batch_size:
        raise ValueError(f"the batch size {batch_size} exceeds the {num_samples} samples")


def _check(eta: float, batch_size: int, num_samples: int | None) -> None:
    if eta <= 0:
        raise ValueError(f"the learning rate must be positive, got {eta}")
    _check_batch(batch_size, num_samples)
