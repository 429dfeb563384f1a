"""Numerics on symmetric operators; they see only ``shape``, ``dtype``, ``device``, ``matmat``."""

from .density import SpectralDensity
from .diagonal import DiagonalEstimate, diagonal
from .eigs import Eigenpairs, top_eigenpairs
from .interface import DenseOperator, LinearOperatorLike, as_operator
from .lanczos import LanczosResult, lanczos
from .scipy_interop import ScipyAsTorch, TorchAsScipy, from_scipy, to_scipy
from .slq import spectral_density
from .trace import TraceEstimate, trace

__all__ = [
    "DenseOperator",
    "DiagonalEstimate",
    "Eigenpairs",
    "LanczosResult",
    "LinearOperatorLike",
    "ScipyAsTorch",
    "SpectralDensity",
    "TorchAsScipy",
    "TraceEstimate",
    "as_operator",
    "diagonal",
    "from_scipy",
    "lanczos",
    "spectral_density",
    "to_scipy",
    "top_eigenpairs",
    "trace",
]
