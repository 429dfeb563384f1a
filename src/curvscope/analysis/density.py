"""Former home of the smoothing conventions and the spectrum structure, kept for old imports.

New code imports from :mod:`curvscope.analysis` (or :mod:`.smoothing`, :mod:`.structure`).
"""

from .smoothing import (
    PAPYAN_KAPPA,
    PAPYAN_MARGIN,
    Convention,
    LogAbsDensity,
    log_abs_density,
    papyan_map,
    papyan_sigma,
    smoothed_density,
)
from .structure import SpectrumStructure, default_cluster_rtol, spectrum_structure

__all__ = [
    "PAPYAN_KAPPA",
    "PAPYAN_MARGIN",
    "Convention",
    "LogAbsDensity",
    "SpectrumStructure",
    "default_cluster_rtol",
    "log_abs_density",
    "papyan_map",
    "papyan_sigma",
    "smoothed_density",
    "spectrum_structure",
]
