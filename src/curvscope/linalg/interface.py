"""What the numerics need from an operator, and a dense stand-in for tests and small problems.

Numerics in :mod:`curvscope.linalg` see only ``shape``, ``dtype``, ``device`` and
``matmat(V)`` on (n, k) blocks; they never see a model.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .scipy_interop import TorchAsScipy, from_scipy, is_scipy_operator, to_scipy


@runtime_checkable
class LinearOperatorLike(Protocol):
    """A symmetric operator of shape (n, n) acting on (n, k) torch blocks."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Apply the operator to the columns of ``V`` (n, k); returns (n, k)."""


#: Alignment (bytes) of torch's CPU allocations; BLAS kernels may pick code paths by it.
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous tensor whose data starts at a multiple of :data:`ALIGNMENT` bytes.

    A copy only when it does not already.

    Intel MKL, torch's BLAS on x86, rounds a product differently when an operand starts at
    another offset modulo 16 bytes (measured: 1e-14 apart for a 120 x 120 float64 matrix
    shifted by 8 bytes). numpy arrays land wherever the heap puts them; torch's own
    allocations are 64-byte aligned. Aligned operands make a product a function of the
    operands' values alone, on one machine with one thread count.
    """
    tensor = tensor.contiguous()
    if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


class DenseOperator:
    """A dense symmetric matrix behind the operator interface (tests, small problems).

    The matrix is used in place when it is contiguous and aligned, else copied once
    (:func:`aligned`), so that its products do not depend on where its memory lies.
    """

    def __init__(self, matrix: torch.Tensor | np.ndarray) -> None:
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = aligned(matrix)
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_products = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply the columns of ``V`` (n, k); counts k products."""
        self.num_products += V.shape[1]
        return self.matrix @ V

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Multiply one vector ``v`` (n,); counts one product."""
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply the columns of ``V`` (n, k) by the transpose; counts k products.

        The same as :meth:`matmat` for the symmetric matrices the numerics expect; exact for
        any matrix (SciPy's ``rmatvec`` of :meth:`to_scipy` uses it).
        """
        self.num_products += V.shape[1]
        return self.matrix.T @ V

    def to_scipy(self) -> TorchAsScipy:
        """The matrix as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out).

        See :func:`curvscope.linalg.scipy_interop.to_scipy`.
        """
        return to_scipy(self)


def as_operator(op: Any) -> LinearOperatorLike:
    """Accept an operator, or wrap a matrix or a SciPy operator in the torch interface.

    Args:
        op: An operator with ``shape``, ``dtype``, ``device`` and ``matmat`` (returned as
            it is); a dense square torch tensor or numpy array (a :class:`DenseOperator`); or
            a SciPy ``LinearOperator``, sparse matrix or sparse array (a
            :class:`~curvscope.linalg.scipy_interop.ScipyAsTorch`, float64 unless the SciPy
            operator is float32; ``op.to_scipy()`` gives back ``op`` itself).

    Raises:
        TypeError: ``op`` is none of these.
    """
    if isinstance(op, (torch.Tensor, np.ndarray)):
        return DenseOperator(op)
    if is_scipy_operator(op):
        return from_scipy(op)
    if not all(hasattr(op, name) for name in ("shape", "dtype", "device", "matmat")):
        raise TypeError(
            f"{type(op).__name__} is not an operator: it needs shape, dtype, device and "
            "matmat(V) for (n, k) blocks (curvscope.HessianOperator is one), or pass a matrix "
            "or a scipy.sparse.linalg.LinearOperator"
        )
    return op


def apply_rows(op: LinearOperatorLike, rows: torch.Tensor) -> torch.Tensor:
    """Apply ``op`` to float64 rows (k, n) in the operator's dtype; returns float64 rows.

    The result is always a fresh-layout contiguous (k, n) tensor (curvscope's operators
    return a transposed view of row-major products, so this is free for them): the arithmetic
    that follows then runs on the same memory layout whatever the operator returned, which a
    resumed Lanczos run relies on to repeat the uninterrupted run's rounding.
    """
    V = rows.T.to(dtype=op.dtype, device=op.device)
    return op.matmat(V).T.to(torch.float64).contiguous()


def gaussian_rows(k: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """k standard Gaussian rows of length n, float64.

    Drawn on the CPU so the seed alone fixes them on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=generator, dtype=torch.float64).to(device)


def rademacher_rows(k: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """k Rademacher (+-1) rows of length n, float64, drawn on the CPU from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (k, n), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(torch.float64).to(device)
