"""curvscope: the curvature of a neural network's loss as linear operators on its parameters.

Operators (:class:`HessianOperator`) know PyTorch models; numerics (:func:`spectral_density`,
:func:`top_eigenpairs`, :func:`trace`, :func:`lanczos`) know only ``matmat``;
:func:`plot_density` draws a density and :mod:`curvscope.zoo` holds built-in problems.
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


def __getattr__(name: str):
    # matplotlib and scikit-learn load only when a figure or a built-in problem is asked for.
    if name == "plot_density":
        from .plot import plot_density

        return plot_density
    if name == "zoo":
        import importlib

        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "plot_density",
    "spectral_density",
    "top_eigenpairs",
    "trace",
    "zoo",
]
