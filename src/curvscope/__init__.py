"""curvscope: the curvature of a neural network's loss as linear operators on its parameters.

Operators (:class:`HessianOperator`) know PyTorch models; numerics (:func:`spectral_density`,
:func:`top_eigenpairs`, :func:`trace`, :func:`lanczos`) know only ``matmat``;
:func:`plot_density` draws a density and :mod:`curvscope.zoo` holds built-in problems.

The names below load their modules (and torch) when first used, not at ``import curvscope``:
the ``curvscope`` program (:mod:`curvscope.program`) sets the OpenMP environment before torch
loads, and matplotlib and scikit-learn load only when a figure or a built-in problem is asked
for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "DenseOperator": "linalg",
    "Eigenpairs": "linalg",
    "LanczosResult": "linalg",
    "SpectralDensity": "linalg",
    "TraceEstimate": "linalg",
    "lanczos": "linalg",
    "spectral_density": "linalg",
    "top_eigenpairs": "linalg",
    "trace": "linalg",
    # diagonal estimators and SciPy interop (issue 13)
    "DiagonalEstimate": "linalg",
    "diagonal": "linalg",
    "from_scipy": "linalg",
    "to_scipy": "linalg",
    "CurvatureOperator": "operators",
    "HessianOperator": "operators",
    # Fisher information (issue 13)
    "EmpiricalFisherOperator": "operators",
    "FisherOperator": "operators",
    "plot_density": "plot",
}

if TYPE_CHECKING:
    from . import zoo
    from .linalg import (
        DenseOperator,
        DiagonalEstimate,
        Eigenpairs,
        LanczosResult,
        SpectralDensity,
        TraceEstimate,
        diagonal,
        from_scipy,
        lanczos,
        spectral_density,
        to_scipy,
        top_eigenpairs,
        trace,
    )
    from .operators import (
        CurvatureOperator,
        EmpiricalFisherOperator,
        FisherOperator,
        HessianOperator,
    )
    from .plot import plot_density


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "zoo":
        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "zoo"})


__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalEstimate",
    "Eigenpairs",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "HessianOperator",
    "LanczosResult",
    "SpectralDensity",
    "TraceEstimate",
    "__version__",
    "diagonal",
    "from_scipy",
    "lanczos",
    "plot_density",
    "spectral_density",
    "to_scipy",
    "top_eigenpairs",
    "trace",
    "zoo",
]
