"""curvscope: the curvature of a neural network's loss as linear operators on its parameters.

Operators (:class:`HessianOperator`) know PyTorch models; numerics (:func:`spectral_density`,
:func:`top_eigenpairs`, :func:`trace`, :func:`lanczos`) know only ``matmat``.
"""

__version__ = "0.1.0"

from .linalg import (
    DenseOperator,
    Eigenpairs,
    LanczosResult,
    SpectralDensity,
    TraceEstimate,
    lanczos,
    spectral_density,
    top_eigenpairs,
    trace,
)
from .operators import CurvatureOperator, HessianOperator

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "Eigenpairs",
    "HessianOperator",
    "LanczosResult",
    "SpectralDensity",
    "TraceEstimate",
    "__version__",
    "lanczos",
    "spectral_density",
    "top_eigenpairs",
    "trace",
]
