"""Extreme eigenpairs of a symmetric operator to a stated relative residual.

Two searches, both in float64 whatever the operator's dtype:

- one extreme pair (k = 1): plain Lanczos with full reorthogonalization from one start
  vector, one product per step, stopped as soon as the Ritz pair's residual estimate
  |beta_j s_j| is below the tolerance. Without restarts this is the fewest products any
  Krylov method needs (a top Hessian eigenvalue to 1e-4 in 9-14 products on the benchmark
  models, against 21 for a 20-vector ARPACK start; docs/comparison.md). The basis is capped
  at ``max_basis_bytes``; past it the search goes on in ARPACK from the Ritz vector.
- several pairs (or the fallback): implicitly restarted Lanczos from ARPACK
  (``scipy.sparse.linalg.eigsh``), whose restarts also find repeated eigenvalues that one
  Lanczos run from a single vector cannot.

Every returned pair is then checked with one extra block product:
residual_i = ||A u_i - lambda_i u_i|| / max(|lambda_i|, ||A||_est); a Lanczos pair that fails
the check is handed on to ARPACK.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from ..results import ResultFile, environment_metadata, save_result
from .interface import LinearOperatorLike, as_operator
from .lanczos import lanczos

Which = Literal["largest", "smallest", "magnitude"]
Method = Literal["auto", "lanczos", "arpack"]
_ARPACK_WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}
#: Lanczos stops when the residual estimate is this fraction of the tolerance, so that the
#: independent check (one more product) passes.
_LANCZOS_MARGIN = 0.5


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs, ordered from the most extreme inwards.

    Attributes:
        values: Eigenvalues, shape (k,).
        vectors: Unit eigenvectors as columns, shape (n, k), float64 (numpy).
        residuals: Relative residuals ||A u - lambda u|| / max(|lambda|, ||A||_est), (k,);
            ||A||_est is a lower bound of ||A||: the largest |Ritz value| of the Lanczos
            search (one pair), else max |values|, raised to a 10-step Lanczos estimate of
            ||A|| when that would leave a pair above ``tol`` ("smallest" of a singular
            matrix).
        converged: ``residuals <= tol``, shape (k,).
        meta: method ("lanczos", "lanczos+arpack" or "arpack-irl"), which, tol, products
            used, seed, wall time, versions.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """``values``, ``residuals`` and ``converged`` as JSON lists, and ``k``.

        Saved as the ``summary`` of the ``.json`` (:meth:`save`).
        """
        return {
            "k": int(self.values.size),
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
        }

    def save(self, path: str | os.PathLike[str], with_vectors: bool = True) -> tuple[Path, Path]:
        """Write ``path.npz`` (values, residuals, converged, vectors) and ``path.json`` (meta).

        The ``.json`` also carries :meth:`summary` as ``summary`` (``load`` reads the arrays
        from the ``.npz`` and skips it).
        """
        arrays = {"values": self.values, "residuals": self.residuals, "converged": self.converged}
        if with_vectors:
            arrays["vectors"] = self.vectors
        meta = {**self.meta, "summary": self.summary(), "kind": "Eigenpairs"}
        return save_result(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Eigenpairs:
        """Read pairs written by :meth:`save`; round-trips exactly.

        Without vectors, when saved with ``with_vectors=False``: ``vectors`` is then an empty (0, k)
        array.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                values not (k,) and finite, residuals not (k,) and >= 0, converged not (k,)
                booleans, vectors not (n, k) finite.
        """
        file = ResultFile(path, "Eigenpairs", "Eigenpairs.save")
        values = file.array("values", shape=(None,), nan=False, inf=False)
        (k,) = values.shape
        residuals = file.array("residuals", shape=(k,), like="(one per value)", minimum=0.0)
        converged = file.array("converged", "bool", shape=(k,), like="(one per value)")
        if "vectors" in file.arrays:
            vectors = file.array(
                "vectors",
                shape=(None, k),
                like="(n, k): one column per value",
                nan=False,
                inf=False,
            )
        else:
            vectors = np.zeros((0, k))
        return cls(values, vectors, residuals, converged, file.meta)


def top_eigenpairs(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-8,
    max_products: int | None = None,
    seed: int = 0,
    method: Method = "auto",
    max_basis_bytes: int = 1 << 30,
) -> Eigenpairs:
    """The k largest (or smallest, or largest-magnitude) eigenpairs of a symmetric operator.

    Args:
        op: Symmetric operator (n, n) with ``matmat``, or a dense matrix.
        k: Number of eigenpairs (k < n).
        which: "largest" (algebraic), "smallest" (algebraic) or "magnitude".
        tol: Relative residual every pair is driven to; with float64 products an eigenvalue
            is then accurate to about tol^2 relative when it is well separated.
        max_products: Approximate cap on operator products: ARPACK gets
            max_products // (ncv - k) restarts, each of at most ncv - k products; default
            100 * n capped at 20 000 products. Pairs not converged by then are returned with
            ``converged`` False (or an error when none converged).
        seed: Seed of the start vector.
        method: "lanczos" (one start vector, no restarts, early stop; falls back to ARPACK
            when the basis cap or the check is hit), "arpack", or "auto": Lanczos for k = 1,
            ARPACK for k > 1.
        max_basis_bytes: Memory cap of the Lanczos basis (float64 n-vectors; at least
            2k + 2 of them). 1 GiB allows 134 steps at n = 1M and 12 at n = 11M (ResNet-18);
            a search that needs more steps goes on in ARPACK (ncv n-vectors) from the Ritz
            vector.

    Returns:
        :class:`Eigenpairs`; ``converged`` says which pairs met ``tol``.

    Example:
        >>> import numpy as np
        >>> from curvscope import top_eigenpairs
        >>> pairs = top_eigenpairs(np.diag([1.0, 2.0, 3.0, 4.0]), k=2)
        >>> pairs.values.round(6).tolist(), pairs.converged.tolist(), pairs.vectors.shape
        ([4.0, 3.0], [True, True], (4, 2))
    """
    op = as_operator(op)
    n = op.shape[0]
    if which not in _ARPACK_WHICH:
        raise ValueError(f"which must be one of {list(_ARPACK_WHICH)}, not {which!r}")
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < n = {n}, got {k}")
    if method not in ("auto", "lanczos", "arpack"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'arpack', not {method!r}")
    started = time.perf_counter()
    counter = {"products": 0}

    def apply(x: np.ndarray) -> np.ndarray:
        block = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(n, -1))
        counter["products"] += block.shape[1]
        result = op.matmat(block.to(device=op.device, dtype=op.dtype))
        return result.to(torch.float64).cpu().numpy()

    def finish(
        values: np.ndarray, vectors: np.ndarray, residuals: np.ndarray, method_used: str
    ) -> Eigenpairs:
        meta = {
            **environment_metadata(),
            "method": method_used,
            "which": which,
            "k": k,
            "tol": tol,
            "num_products": counter["products"],
            "seed": seed,
            "operator_dtype": str(op.dtype).replace("torch.", ""),
            "operator": type(op).__name__,
            "wall_time_s": time.perf_counter() - started,
        }
        return Eigenpairs(values, vectors, residuals, residuals <= tol, meta)

    budget = max_products or min(100 * n, 20_000)
    use_lanczos = method == "lanczos" or (method == "auto" and k == 1)
    norm_est = float(np.finfo(np.float64).tiny)
    start_vector = None
    if use_lanczos:
        steps = min(n, budget, max(2 * k + 2, max_basis_bytes // (8 * n)))
        values, vectors, ritz_norm, done = _lanczos_pairs(op, k, which, tol, steps, seed)
        counter["products"] += done
        norm_est = max(norm_est, ritz_norm)
        if values is not None:
            residuals = _residuals(apply, values, vectors, norm_est)
            if np.all(residuals <= tol):
                return finish(values, vectors, residuals, "lanczos")
            start_vector = vectors[:, 0]
    values, vectors = _arpack_pairs(
        apply, n, k, which, tol, max(1, budget - counter["products"]), seed, start_vector
    )
    norm_est = max(norm_est, float(np.max(np.abs(values))))
    errors = _errors(apply, values, vectors)
    if which != "magnitude" and np.any(errors > tol * norm_est):
        # The pairs asked for can be far below ||A|| (the smallest eigenvalues of a positive
        # semi-definite Gauss-Newton matrix are ~0, and errors ~eps ||A|| then look huge):
        # estimate ||A|| before calling a pair unconverged.
        norm_est = max(norm_est, _norm_estimate(op, seed, counter))
    residuals = errors / np.maximum(np.abs(values), norm_est)
    method_used = "lanczos+arpack" if use_lanczos else "arpack-irl"
    return finish(values, vectors, residuals, method_used)


def _order(values: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``values`` from the most extreme (by ``which``) inwards."""
    if which == "largest":
        return np.argsort(-values, kind="stable")
    if which == "smallest":
        return np.argsort(values, kind="stable")
    return np.argsort(-np.abs(values), kind="stable")


def _errors(apply: Any, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """||A u_i - lambda_i u_i|| for every pair, by one block product."""
    return np.linalg.norm(apply(vectors) - vectors * values, axis=0)


def _residuals(apply: Any, values: np.ndarray, vectors: np.ndarray, norm_est: float) -> np.ndarray:
    return _errors(apply, values, vectors) / np.maximum(np.abs(values), norm_est)


def _lanczos_pairs(
    op: LinearOperatorLike, k: int, which: str, tol: float, max_steps: int, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None, float, int]:
    """Plain Lanczos (full reorthogonalization, one start vector) to a residual tolerance.

    Runs until the k wanted Ritz pairs' residual estimates |beta_j s_{j,i}| are below
    ``_LANCZOS_MARGIN * tol`` relative to max(|theta_i|, max |Ritz value|), or ``max_steps``.

    Returns (values (k,), vectors (n, k), max |Ritz value|, products); values and vectors are
    None when fewer than k Ritz values exist (a breakdown before k steps).
    """

    def ritz(alphas: np.ndarray, betas: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        T = (
            np.diag(alphas[:steps])
            + np.diag(betas[: steps - 1], 1)
            + np.diag(betas[: steps - 1], -1)
        )
        return np.linalg.eigh(T)

    def converged(alphas: np.ndarray, betas: np.ndarray, num_steps: np.ndarray) -> bool:
        steps = int(num_steps[0])
        if steps < k:
            return False
        thetas, S = ritz(alphas[0], betas[0], steps)
        wanted = _order(thetas, which)[:k]
        scale = np.maximum(np.abs(thetas[wanted]), np.max(np.abs(thetas)))
        estimates = betas[0, steps - 1] * np.abs(S[steps - 1, wanted])
        return bool(np.all(estimates <= _LANCZOS_MARGIN * tol * scale))

    result = lanczos(op, max_steps, seed=seed, keep_basis=True, stop=converged)
    try:
        steps = int(result.num_steps[0])
        thetas, S = ritz(result.alphas[0], result.betas[0], steps)
        norm = float(np.max(np.abs(thetas)))
        if steps < k:
            return None, None, norm, steps
        wanted = _order(thetas, which)[:k]
        basis = result.basis.vectors(0, steps)  # rows (steps, n), float64
        coefficients = torch.as_tensor(S[:, wanted], dtype=torch.float64, device=basis.device)
        vectors = (basis.T @ coefficients).cpu().numpy()
        vectors /= np.linalg.norm(vectors, axis=0)
        return thetas[wanted], vectors, norm, steps
    finally:
        result.basis.close()


def _arpack_pairs(
    apply: Any,
    n: int,
    k: int,
    which: str,
    tol: float,
    budget: int,
    seed: int,
    start_vector: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """ARPACK's implicitly restarted Lanczos, pairs ordered from the most extreme inwards."""
    linear = LinearOperator((n, n), matvec=apply, matmat=apply, dtype=np.float64)
    if start_vector is None:
        start_vector = np.random.default_rng(seed).standard_normal(n)
    # Krylov size: 20 vectors always cost 22 products for one pair; 10 converged the top
    # eigenvalue of network Hessians in 13 (docs/comparison.md).
    ncv = min(n, max(2 * k + 2, 10))
    maxiter = max(1, budget // max(1, ncv - k))
    try:
        values, vectors = eigsh(
            linear,
            k=k,
            which=_ARPACK_WHICH[which],
            tol=tol * 1e-2,
            v0=start_vector,
            ncv=ncv,
            maxiter=maxiter,
        )
    except ArpackNoConvergence as error:
        values, vectors = error.eigenvalues, error.eigenvectors
        if values.size == 0:
            raise RuntimeError(
                f"no eigenpair converged within about {budget} products: raise max_products"
            ) from error
    order = _order(values, which)
    return values[order], vectors[:, order]


def _norm_estimate(op: LinearOperatorLike, seed: int, counter: dict[str, int]) -> float:
    """max |Ritz value| of 10 Lanczos steps: a lower bound of ||A||, close to it in practice."""
    result = lanczos(op, min(op.shape[0], 10), seed=seed)
    counter["products"] += int(result.num_steps.sum())
    alphas, betas = result.tridiagonal(0)
    ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
    return float(np.max(np.abs(ritz)))
