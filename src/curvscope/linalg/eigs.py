"""Extreme eigenpairs of a symmetric operator to a stated relative residual.

Implicitly restarted Lanczos from ARPACK (``scipy.sparse.linalg.eigsh``) drives the search in
float64; every returned pair is then checked with one extra block product:
residual_i = ||A u_i - lambda_i u_i|| / max(|lambda_i|, ||A||_est).
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

from ..results import environment_metadata, load_result, save_result
from .interface import LinearOperatorLike, as_operator
from .lanczos import lanczos

Which = Literal["largest", "smallest", "magnitude"]
_ARPACK_WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs, ordered from the most extreme inwards.

    Attributes:
        values: Eigenvalues, shape (k,).
        vectors: Unit eigenvectors as columns, shape (n, k), float64 (numpy).
        residuals: Relative residuals ||A u - lambda u|| / max(|lambda|, ||A||_est), (k,);
            ||A||_est is max |values|, or a 10-step Lanczos estimate of ||A|| when that
            would leave a pair above ``tol`` ("smallest" of a singular matrix).
        converged: ``residuals <= tol``, shape (k,).
        meta: which, tol, products used, seed, wall time, versions.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], with_vectors: bool = True) -> tuple[Path, Path]:
        arrays = {"values": self.values, "residuals": self.residuals, "converged": self.converged}
        if with_vectors:
            arrays["vectors"] = self.vectors
        return save_result(path, arrays, {**self.meta, "kind": "Eigenpairs"})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Eigenpairs:
        arrays, meta = load_result(path)
        meta.pop("kind", None)
        vectors = arrays.get("vectors", np.zeros((0, arrays["values"].size)))
        return cls(arrays["values"], vectors, arrays["residuals"], arrays["converged"], meta)


def top_eigenpairs(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-8,
    max_products: int | None = None,
    seed: int = 0,
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
            20 000.
        seed: Seed of ARPACK's start vector.

    Returns:
        :class:`Eigenpairs`; ``converged`` says which pairs met ``tol``.
    """
    op = as_operator(op)
    n = op.shape[0]
    if which not in _ARPACK_WHICH:
        raise ValueError(f"which must be one of {list(_ARPACK_WHICH)}, not {which!r}")
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < n = {n}, got {k}")
    started = time.perf_counter()
    counter = {"products": 0}

    def apply(x: np.ndarray) -> np.ndarray:
        block = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(n, -1))
        counter["products"] += block.shape[1]
        result = op.matmat(block.to(device=op.device, dtype=op.dtype))
        return result.to(torch.float64).cpu().numpy()

    linear = LinearOperator((n, n), matvec=apply, matmat=apply, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    budget = max_products or min(100 * n, 20_000)
    # Krylov size: 20 vectors always cost 22 products for one pair; 10 converged the top
    # eigenvalue of network Hessians in 13 (docs/comparison.md).
    ncv = min(n, max(2 * k + 2, 10))
    maxiter = max(1, budget // max(1, ncv - k))
    try:
        values, vectors = eigsh(
            linear, k=k, which=_ARPACK_WHICH[which], tol=tol * 1e-2, v0=v0, ncv=ncv, maxiter=maxiter
        )
    except ArpackNoConvergence as error:
        values, vectors = error.eigenvalues, error.eigenvectors
        if values.size == 0:
            raise RuntimeError(
                f"no eigenpair converged within about {budget} products: raise max_products"
            ) from error
    order = {"largest": np.argsort(-values), "smallest": np.argsort(values)}.get(
        which, np.argsort(-np.abs(values))
    )
    values, vectors = values[order], vectors[:, order]
    image = apply(vectors)
    errors = np.linalg.norm(image - vectors * values, axis=0)
    norm_est = max(float(np.max(np.abs(values))), np.finfo(np.float64).tiny)
    if which != "magnitude" and np.any(errors > tol * norm_est):
        # The pairs asked for can be far below ||A|| (the smallest eigenvalues of a positive
        # semi-definite Gauss-Newton matrix are ~0, and errors ~eps ||A|| then look huge):
        # estimate ||A|| before calling a pair unconverged.
        norm_est = max(norm_est, _norm_estimate(op, seed, counter))
    residuals = errors / np.maximum(np.abs(values), norm_est)
    meta = {
        **environment_metadata(),
        "method": "arpack-irl",
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


def _norm_estimate(op: LinearOperatorLike, seed: int, counter: dict[str, int]) -> float:
    """max |Ritz value| of 10 Lanczos steps: a lower bound of ||A||, close to it in practice."""
    result = lanczos(op, min(op.shape[0], 10), seed=seed)
    counter["products"] += int(result.num_steps.sum())
    alphas, betas = result.tridiagonal(0)
    ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
    return float(np.max(np.abs(ritz)))
