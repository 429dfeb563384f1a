"""Numerics on symmetric operators; they see only ``shape``, ``dtype``, ``device``, ``matmat``."""

from .density import SpectralDensity
from .eigs import Eigenpairs, top_eigenpairs
from .interface import DenseOperator, LinearOperatorLike, as_operator
from .lanczos import LanczosResult, lanczos
from .slq import spectral_density
from .trace import TraceEstimate, trace

__all__ = [
    "DenseOperator",
    "Eigenpairs",
    "LanczosResult",
    "LinearOperatorLike",
    "SpectralDensity",
    "TraceEstimate",
    "as_operator",
    "lanczos",
    "spectral_density",
    "top_eigenpairs",
    "trace",
]
