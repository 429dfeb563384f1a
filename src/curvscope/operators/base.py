"""The one interface of the house: a symmetric linear operator on the flat parameter vector."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..linalg.scipy_interop import TorchAsScipy


class CurvatureOperator(ABC):
    """Symmetric linear operator of shape (n, n) acting on flat parameter vectors.

    Subclasses implement :meth:`_matmat`; ``matvec``, ``matmat`` and ``@`` check their
    input once here, so every operator reports a wrong shape, dtype or device the same way.

    Attributes:
        shape: (n, n).
        dtype: dtype of the vectors the operator takes and returns.
        device: device of those vectors.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Apply the operator to the validated block ``V`` of shape (n, k); returns (n, k)."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Apply the operator to one vector ``v`` of shape (n,); returns shape (n,)."""
        if v.ndim != 1:
            raise ValueError(
                f"matvec expects a 1-D vector of length {self.shape[0]}, got shape "
                f"{tuple(v.shape)}: use matmat for (n, k) blocks"
            )
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Apply the operator to the columns of ``V`` of shape (n, k); returns (n, k)."""
        self._check(V)
        if V.shape[1] == 0:
            return V.clone()
        return self._matmat(V)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def to_dense(self, block_size: int = 64) -> torch.Tensor:
        """Dense (n, n) matrix of the operator, built ``block_size`` columns at a time.

        Only for small n: it costs n / block_size products and n^2 memory.
        """
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[:, i : i + block_size]) for i in range(0, n, block_size)]
        return torch.cat(cols, dim=1)

    def to_scipy(self) -> TorchAsScipy:
        """The operator as a ``scipy.sparse.linalg.LinearOperator``: numpy in, numpy out.

        Inputs are converted to the operator's dtype and device, results come back as numpy
        arrays of the matching dtype (float64 for a float64 operator); ``matvec``, ``matmat``
        and ``@`` go through :meth:`matmat` (a block costs one data pass), and ``rmatvec`` is
        ``matvec`` (the operator is symmetric). Use it where SciPy wants an operator:
        ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=5)``; ``aslinearoperator(op)`` itself
        cannot work (SciPy reads ``op.dtype``, a torch dtype, through ``numpy.dtype``).

        Raises:
            ValueError: The operator's dtype has no numpy counterpart (bfloat16).
        """
        # Imported here: the operators load without SciPy until it is asked for.
        from ..linalg.scipy_interop import to_scipy

        return to_scipy(self)

    def _check(self, V: torch.Tensor) -> None:
        n = self.shape[0]
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape (n={n}, k), got {type(V).__name__}")
        if V.ndim != 2 or V.shape[0] != n:
            raise ValueError(
                f"expected a block of shape (n={n}, k), got {tuple(V.shape)}: "
                "vectors are flat over the analysed parameters (see operator.num_params)"
            )
        if V.dtype != self.dtype:
            raise ValueError(
                f"vector dtype {V.dtype} does not match the operator's {self.dtype}: "
                f"convert with v.to({self.dtype})"
            )
        if V.device != self.device and not (
            V.device.type == self.device.type and self.device.index is None
        ):
            raise ValueError(
                f"vector is on {V.device} but the operator works on {self.device}: "
                f"move it with v.to('{self.device}')"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )
