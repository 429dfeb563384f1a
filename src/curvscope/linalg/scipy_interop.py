"""Both directions between curvscope operators and ``scipy.sparse.linalg.LinearOperator``.

- :func:`to_scipy` shows a curvscope operator (torch blocks in, torch blocks out) to SciPy: a
  :class:`TorchAsScipy` takes and returns numpy arrays in the operator's float dtype, and
  ``matvec``, ``matmat`` and ``@`` all go through the operator's batched ``matmat`` (one data
  pass per block, not per column).
- :func:`from_scipy` does the opposite: a SciPy ``LinearOperator``, sparse matrix or sparse
  array becomes a :class:`ScipyAsTorch` that the numerics (:func:`~curvscope.lanczos`,
  :func:`~curvscope.spectral_density`, :func:`~curvscope.top_eigenpairs`,
  :func:`~curvscope.trace`, :func:`~curvscope.linalg.diagonal`) accept;
  :func:`~curvscope.linalg.interface.as_operator` calls it, so they can be passed directly.

``scipy.sparse.linalg.aslinearoperator(op)`` on a curvscope operator cannot work: SciPy reads
``op.dtype`` through ``numpy.dtype``, which does not know ``torch.float64`` (and
``torch.dtype`` can neither be subclassed nor given attributes), and it would then call
``op.matvec`` with numpy arrays. ``op.to_scipy()`` is the supported route; SciPy's own functions
(``eigsh``, ``cg``, ``aslinearoperator``) accept its result as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator

#: A curvscope operator (a :class:`~curvscope.linalg.interface.LinearOperatorLike`): this module
#: sits below :mod:`~curvscope.linalg.interface`, which calls :func:`from_scipy`.
Operator = Any

#: torch float dtypes with a numpy counterpart.
_NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch float dtype (float64, float32, float16).

    Raises:
        ValueError: For dtypes numpy lacks (bfloat16) and non-float dtypes.
    """
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(
            f"SciPy has no dtype for an operator in {dtype}: build the operator in float64 or "
            "float32 (dtype=torch.float64) to hand it to SciPy"
        )
    return _NUMPY_DTYPES[dtype]


def _is_operator(op: Any) -> bool:
    return all(hasattr(op, name) for name in ("shape", "dtype", "device", "matmat"))


class TorchAsScipy(LinearOperator):
    """A curvscope operator seen by SciPy: numpy arrays in, numpy arrays out.

    Inputs of any real or complex dtype are converted to the operator's dtype (a float64
    vector loses precision on a float32 operator) and moved to its device; outputs are numpy
    arrays in the operator's dtype (:attr:`dtype`) on the CPU. A complex block X is applied
    as A Re(X) + i A Im(X) in one ``matmat`` (the operators are real). ``matvec``, ``matmat``
    and ``@`` are SciPy's; each block costs one ``matmat`` of the operator.

    The transpose: ``op.rmatmat`` when the operator has one (the non-symmetric
    :class:`~curvscope.operators.update.UpdateOperator`, :class:`DenseOperator`); otherwise
    the operator is symmetric by curvscope's contract and ``rmatvec`` is ``matvec``. With
    ``symmetric=False`` and no ``rmatmat``, ``rmatvec`` raises.

    Args:
        op: Operator with ``shape``, ``dtype``, ``device`` and ``matmat`` on (n, k) torch
            blocks.
        symmetric: Whether A^T = A may be assumed when ``op`` has no ``rmatmat``. Default
            True (every curvature operator is symmetric).

    Attributes:
        operator: The wrapped curvscope operator.
        dtype: numpy dtype of the results (float64 for a float64 operator).
        shape: The operator's shape.
    """

    def __init__(self, op: Operator, symmetric: bool = True) -> None:
        if not _is_operator(op):
            raise TypeError(
                f"{type(op).__name__} is not an operator: to_scipy needs shape, dtype, device "
                "and matmat(V) for (n, k) torch blocks"
            )
        super().__init__(numpy_dtype(op.dtype), tuple(op.shape))
        self.operator = op
        self._rmatmat_fn = getattr(op, "rmatmat", None)
        self.symmetric = self._rmatmat_fn is None and symmetric

    def _apply(self, X: np.ndarray, transpose: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a block of shape ({self.shape[1]}, k), got {X.shape}")
        if np.iscomplexobj(X):
            k = X.shape[1]
            both = self._apply(np.concatenate([X.real, X.imag], axis=1), transpose)
            return both[:, :k] + 1j * both[:, k:]
        if transpose:
            if self._rmatmat_fn is None and not self.symmetric:
                raise NotImplementedError(
                    f"{type(self.operator).__name__} is not symmetric and has no rmatmat: "
                    "SciPy cannot apply its transpose"
                )
            apply = self._rmatmat_fn or self.operator.matmat
        else:
            apply = self.operator.matmat
        op = self.operator
        V = torch.tensor(X, dtype=op.dtype, device=op.device)  # a copy in torch's memory
        out = apply(V)
        return np.ascontiguousarray(out.detach().to("cpu").numpy())

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X, transpose=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(np.reshape(x, (-1, 1)), transpose=False)[:, 0]

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X, transpose=True)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(np.reshape(x, (-1, 1)), transpose=True)[:, 0]

    def _adjoint(self) -> LinearOperator:
        # A real symmetric operator is its own adjoint; SciPy's default wraps rmatvec.
        return self if self.symmetric else super()._adjoint()

    def _transpose(self) -> LinearOperator:
        return self if self.symmetric else super()._transpose()


def to_scipy(op: Operator, symmetric: bool = True) -> TorchAsScipy:
    """``op`` as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out).

    Args:
        op: A curvscope operator, or anything with ``shape``, ``dtype`` (torch float64,
            float32 or float16), ``device`` and ``matmat`` on (n, k) torch blocks.
        symmetric: Whether ``rmatvec`` may use ``matvec`` when ``op`` has no ``rmatmat``.

    Returns:
        :class:`TorchAsScipy` of shape ``op.shape`` and the numpy dtype of ``op.dtype``.

    Raises:
        TypeError: ``op`` is not an operator.
        ValueError: ``op.dtype`` has no numpy counterpart (bfloat16).

    Example:
        >>> import numpy as np
        >>> from scipy.sparse.linalg import eigsh
        >>> from curvscope import DenseOperator
        >>> A = DenseOperator(np.diag([1.0, 2.0, 3.0, 4.0])).to_scipy()
        >>> A
        <4x4 TorchAsScipy with dtype=float64>
        >>> sorted(eigsh(A, k=2, return_eigenvectors=False).round(6).tolist())
        [3.0, 4.0]
    """
    return TorchAsScipy(op, symmetric=symmetric)


class ScipyAsTorch:
    """A SciPy ``LinearOperator``, sparse matrix or sparse array behind curvscope's interface.

    Blocks are applied on the CPU in numpy: a torch block (n, k) is converted to a numpy
    array, multiplied by SciPy (``A.matmat``) and converted back to :attr:`dtype`.

    Args:
        A: Square SciPy ``LinearOperator`` or sparse matrix (anything
            ``scipy.sparse.linalg.aslinearoperator`` takes), real.
        dtype: torch dtype of the blocks; default float32 for a float32 operator, else
            float64 (integer and float16 operators are computed in float64).

    Attributes:
        linear_operator: The SciPy ``LinearOperator``.
        shape, dtype, device: (n, n), the torch dtype, ``cpu``.
        num_products: Columns multiplied so far.

    Raises:
        ValueError: A non-square or complex operator.
    """

    def __init__(self, A: Any, dtype: torch.dtype | None = None) -> None:
        linear = aslinearoperator(A)
        if len(linear.shape) != 2 or linear.shape[0] != linear.shape[1]:
            raise ValueError(
                f"expected a square operator (n, n), got shape {tuple(linear.shape)}: the "
                "numerics need a symmetric matrix"
            )
        if np.dtype(linear.dtype).kind == "c":
            raise ValueError(
                f"the SciPy operator is complex ({linear.dtype}): curvscope's numerics need a "
                "real symmetric operator"
            )
        if dtype is None:
            dtype = torch.float32 if np.dtype(linear.dtype) == np.float32 else torch.float64
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, not {dtype}")
        self.linear_operator = linear
        self.shape = (int(linear.shape[0]), int(linear.shape[1]))
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.num_products = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply the columns of ``V`` (n, k) with SciPy; returns (n, k) in :attr:`dtype`."""
        return self._apply(V, self.linear_operator.matmat)

    def rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply the columns of ``V`` (n, k) by the transpose (SciPy's ``rmatmat``)."""
        return self._apply(V, self.linear_operator.rmatmat)

    def _apply(self, V: torch.Tensor, apply: Any) -> torch.Tensor:
        n = self.shape[0]
        if not isinstance(V, torch.Tensor) or V.ndim != 2 or V.shape[0] != n:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"expected a torch block of shape (n={n}, k), got {got}")
        self.num_products += V.shape[1]
        X = V.detach().to("cpu", self.dtype).numpy()
        out = np.asarray(apply(X))
        if np.iscomplexobj(out):
            raise ValueError("the SciPy operator returned complex values for a real block")
        return torch.tensor(out, dtype=self.dtype).reshape(n, V.shape[1])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Multiply one vector ``v`` (n,); counts one product."""
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __repr__(self) -> str:
        return f"ScipyAsTorch({self.linear_operator!r}, dtype={self.dtype})"


def is_scipy_operator(A: Any) -> bool:
    """Whether ``A`` is a SciPy ``LinearOperator``, sparse matrix or sparse array."""
    return isinstance(A, LinearOperator) or scipy.sparse.issparse(A)


def from_scipy(A: Any, dtype: torch.dtype | None = None) -> Operator:
    """A SciPy operator or sparse matrix as a curvscope operator (see :class:`ScipyAsTorch`).

    A :class:`TorchAsScipy` (the result of ``op.to_scipy()``) gives back its own operator,
    so a round trip costs nothing and keeps the operator's device.

    Args:
        A: SciPy ``LinearOperator``, sparse matrix or sparse array, square and real.
        dtype: Block dtype; default float64 (float32 for a float32 operator).

    Returns:
        An operator with ``shape``, ``dtype``, ``device`` and ``matmat``.
    """
    if isinstance(A, TorchAsScipy) and (dtype is None or dtype == A.operator.dtype):
        return A.operator
    return ScipyAsTorch(A, dtype)
