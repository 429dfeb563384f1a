"""Gradient concentration in the top eigenspace, and overlaps of top eigenspaces.

Gur-Ari, Roberts & Dyer 2018 ("Gradient descent happens in a tiny subspace") measure the
share of the gradient that lies in the span of the Hessian's top-k eigenvectors, k the number
of classes; Ghorbani, Krishnan & Xiao 2019 report the same concentration for networks without
BatchNorm and its absence with BatchNorm. A random direction scores k/n.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import all_reduce_total_
from ..linalg import Eigenpairs, top_eigenpairs
from ..linalg.eigs import Which
from ..linalg.interface import LinearOperatorLike, as_operator
from ..results import ResultFile, environment_metadata, save_result
from ..rng import preserved_rng


@dataclass(frozen=True)
class GradientOverlap:
    """How much of a gradient g lies in the top-k eigenspace of a curvature operator A.

    Attributes:
        k: Size of the eigenspace.
        n: Dimension of the operator.
        overlap: ||P_k g||^2 / ||g||^2 in [0, 1], P_k the orthogonal projector on the span of
            the top-k eigenvectors u_1..u_k.
        shares: (u_i . g)^2 / ||g||^2 per eigenvector, shape (k,), in the order of
            ``eigenvalues``; they sum to ``overlap``.
        eigenvalues: The k eigenvalues, shape (k,), natural units of A.
        baseline: k / n, the expected overlap of a uniformly random direction.
        curvature: g^T A g / ||g||^2, the curvature along the gradient (units of A).
        gradient_norm: ||g||.
        meta: which, tol, residuals of the eigenpairs, converged, versions.
    """

    k: int
    n: int
    overlap: float
    shares: np.ndarray
    eigenvalues: np.ndarray
    baseline: float
    curvature: float
    gradient_norm: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (shares, eigenvalues) and ``path.json`` (the rest).

        The ``.json`` also lists the eigenvalues and shares as ``summary`` (``load`` reads them
        from the ``.npz``).
        """
        arrays = {"shares": self.shares, "eigenvalues": self.eigenvalues}
        meta = {
            **self.meta,
            "k": self.k,
            "n": self.n,
            "overlap": self.overlap,
            "baseline": self.baseline,
            "curvature": self.curvature,
            "gradient_norm": self.gradient_norm,
            "summary": {"eigenvalues": self.eigenvalues.tolist(), "shares": self.shares.tolist()},
            "kind": "GradientOverlap",
        }
        return save_result(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GradientOverlap:
        """Read a result written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                n not a positive integer, k not in [1, n], shares or eigenvalues not (k,),
                shares or a norm negative, converged not a boolean.
        """
        file = ResultFile(path, "GradientOverlap", "GradientOverlap.save")
        n = file.integer("n", minimum=1)
        k = file.integer("k", minimum=1, maximum=n)
        shares = file.array("shares", shape=(k,), like="(one per eigenvector)", minimum=0.0)
        eigenvalues = file.array("eigenvalues", shape=(k,), like="(k,)", nan=False, inf=False)
        file.check_optional("converged", file.boolean)
        return cls(
            k=k,
            n=n,
            overlap=file.number("overlap", minimum=0.0),
            shares=shares,
            eigenvalues=eigenvalues,
            baseline=file.number("baseline", nan=False, inf=False, minimum=0.0),
            curvature=file.number("curvature"),
            gradient_norm=file.number("gradient_norm", minimum=0.0),
            meta=file.meta,
        )


def full_gradient(op: Any) -> torch.Tensor:
    """Gradient of an operator's mean loss over its whole data source, as a flat vector.

    g = (1/N) sum_b |b| grad L_b, with L_b the mean loss of batch b (so an uneven last batch
    is exact), at the operator's frozen parameter copy, in the operator's dtype and device and
    flat-vector order. The model is not touched (no ``.grad`` written, buffers and RNG state
    kept), as for the operator's own products.

    Args:
        op: A dataset operator such as :class:`~curvscope.operators.HessianOperator` (it
            needs ``source``, ``batch_loss`` and ``function``).

    Returns:
        Tensor of shape (n,).
    """
    missing = [name for name in ("source", "batch_loss", "function") if not hasattr(op, name)]
    if missing:
        raise TypeError(
            f"{type(op).__name__} has no {missing}: full_gradient needs an operator built from "
            "a model and data (HessianOperator, GGNOperator, ...); pass the gradient yourself"
        )
    leaves = op.function.param_list()
    total = torch.zeros(op.shape[0], dtype=op.dtype, device=op.device)
    num_samples = 0
    with preserved_rng(), torch.enable_grad():
        for batch in op.source:
            loss = op.batch_loss(batch)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            total.add_(op.function.join([g.detach() for g in grads]), alpha=float(batch.size))
            num_samples += batch.size
    num_samples = all_reduce_total_(total, num_samples)  # each rank walked its shard
    if num_samples == 0:
        raise ValueError("data yielded no batches: the data source must be re-iterable")
    return total.div_(num_samples)


def gradient_overlap(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    gradient: torch.Tensor,
    k: int | None = None,
    num_classes: int | None = None,
    eigenpairs: Eigenpairs | None = None,
    tol: float = 1e-8,
    which: Which = "largest",
    seed: int = 0,
) -> GradientOverlap:
    """Share of a gradient in the top-k eigenspace of a symmetric operator.

    overlap = ||P_k g||^2 / ||g||^2 = sum_i (u_i . g)^2 / ||g||^2 (Gur-Ari et al. 2018), with
    u_1..u_k the eigenvectors of the k largest eigenvalues; a random direction scores k/n.
    Also the curvature along the gradient g^T A g / ||g||^2 (one product).

    Args:
        op: Symmetric operator (n, n) with ``matmat`` (a curvature operator or a dense
            matrix).
        gradient: Flat vector of shape (n,) (e.g. :func:`full_gradient`); cast to float64
            for the projections and to the operator's dtype and device for the product.
        k: Eigenspace size; default ``num_classes``, then ``op.num_classes`` when the
            operator has it, then the number of given ``eigenpairs``.
        num_classes: Number of classes C, the default k (Gur-Ari et al.: top-C eigenspace).
        eigenpairs: Precomputed eigenpairs (at least k, ordered from the top); otherwise
            :func:`~curvscope.linalg.top_eigenpairs` computes them to relative residual
            ``tol``.
        tol: Residual tolerance of the eigenpairs computed here.
        which: Which end of the spectrum ("largest" algebraic by default; "magnitude" also
            counts large negative eigenvalues).
        seed: Seed of the eigensolver's start vector.

    Returns:
        :class:`GradientOverlap`.
    """
    op = as_operator(op)
    n = op.shape[0]
    if not isinstance(gradient, torch.Tensor) or gradient.ndim != 1 or gradient.numel() != n:
        shape = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient)
        raise ValueError(f"gradient must be a flat tensor of shape (n={n},), got {shape}")
    if k is None:
        k = num_classes if num_classes is not None else getattr(op, "num_classes", None)
    if k is None and eigenpairs is not None:
        k = int(eigenpairs.values.size)
    if k is None:
        raise ValueError(
            "say how many top eigenvectors to project on: pass k (or num_classes, the usual "
            "choice: Gur-Ari et al. 2018 use the top-C eigenspace for C classes)"
        )
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got {k}")
    g64 = gradient.detach().to(device="cpu", dtype=torch.float64).numpy()
    norm2 = float(g64 @ g64)
    if not np.isfinite(norm2) or norm2 == 0.0:
        raise ValueError(f"the gradient has squared norm {norm2}: the overlap is undefined")
    if eigenpairs is None:
        eigenpairs = top_eigenpairs(op, k=k, which=which, tol=tol, seed=seed)
    if eigenpairs.values.size < k or eigenpairs.vectors.shape != (n, eigenpairs.values.size):
        raise ValueError(
            f"eigenpairs hold {eigenpairs.values.size} vectors of shape "
            f"{eigenpairs.vectors.shape}, but k = {k} vectors of length n = {n} are needed"
        )
    U = np.asarray(eigenpairs.vectors[:, :k], dtype=np.float64)
    shares = (U.T @ g64) ** 2 / norm2
    g_op = gradient.detach().to(device=op.device, dtype=op.dtype)
    image = op.matmat(g_op.unsqueeze(1)).squeeze(1)
    curvature = float(g_op.to(torch.float64) @ image.to(torch.float64)) / norm2
    meta = {
        **environment_metadata(),
        "which": eigenpairs.meta.get("which", which),
        "tol": eigenpairs.meta.get("tol", tol),
        "residuals": np.asarray(eigenpairs.residuals[:k]).tolist(),
        "converged": bool(np.all(eigenpairs.converged[:k])),
        "operator": type(op).__name__,
        "operator_dtype": str(op.dtype).replace("torch.", ""),
    }
    return GradientOverlap(
        k=k,
        n=n,
        overlap=float(np.sum(shares)),
        shares=shares,
        eigenvalues=np.asarray(eigenpairs.values[:k], dtype=np.float64),
        baseline=k / n,
        curvature=curvature,
        gradient_norm=float(np.sqrt(norm2)),
        meta=meta,
    )


def _basis(U: Eigenpairs | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(U, Eigenpairs):
        U = U.vectors
    if isinstance(U, torch.Tensor):
        U = U.detach().to(device="cpu", dtype=torch.float64).numpy()
    U = np.asarray(U, dtype=np.float64)
    if U.ndim == 1:
        U = U[:, None]
    if U.ndim != 2 or U.shape[1] == 0:
        raise ValueError(f"{name} must be an (n, k) basis with k >= 1, got shape {U.shape}")
    return U


def subspace_overlap(
    U1: Eigenpairs | np.ndarray | torch.Tensor,
    U2: Eigenpairs | np.ndarray | torch.Tensor,
    k: int | None = None,
    atol: float = 1e-5,
) -> float:
    """Overlap (1/k) tr(P1 P2) = ||U1^T U2||_F^2 / k of two k-dimensional subspaces.

    1 for the same subspace, 0 for orthogonal ones, k/n in expectation for random ones
    (Gur-Ari et al. 2018 compare top-k Hessian eigenspaces between checkpoints this way).

    Args:
        U1: Orthonormal basis as columns, shape (n, k1): an array, a tensor or
            :class:`~curvscope.linalg.Eigenpairs` (its ``vectors``).
        U2: The other basis, shape (n, k2), likewise.
        k: Use only the first k columns of each. By default all columns are used and the
            overlap is normalised by min(k1, k2), so with k1 != k2 it is 1 when the smaller
            subspace lies in the larger.
        atol: Largest allowed entry of |U^T U - I| (orthonormality check).

    Returns:
        The overlap, a float in [0, 1].

    Example:
        A line inside a plane: the smaller subspace lies in the larger one.

        >>> import numpy as np
        >>> from curvscope.analysis import subspace_overlap
        >>> subspace_overlap(np.eye(3)[:, :1], np.eye(3)[:, :2])
        1.0
    """
    A, B = _basis(U1, "U1"), _basis(U2, "U2")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"the bases live in different spaces: n = {A.shape[0]} vs {B.shape[0]}")
    smaller = min(A.shape[1], B.shape[1])
    if k is not None:
        if not 1 <= int(k) <= smaller:
            raise ValueError(f"k must lie in [1, {smaller}], got {k}")
        A, B = A[:, : int(k)], B[:, : int(k)]
        smaller = int(k)
    for name, Q in (("U1", A), ("U2", B)):
        error = float(np.max(np.abs(Q.T @ Q - np.eye(Q.shape[1]))))
        if error > atol:
            raise ValueError(
                f"{name} is not orthonormal (max |U^T U - I| = {error:.2e}): pass eigenvectors, "
                "or orthonormalise the columns first (numpy.linalg.qr)"
            )
    return float(np.sum((A.T @ B) ** 2) / smaller)
