"""Analysis of curvature spectra, built on :mod:`curvscope.linalg` and :mod:`curvscope.operators`.

Density conventions and structure, gradient concentration, per-block spectra, stability thresholds
and the stochastic edge.
"""

from .blocks import BlockSpectra, block_spectra, default_groups, resolve_groups
from .overlap import GradientOverlap, full_gradient, gradient_overlap, subspace_overlap
from .smoothing import LogAbsDensity, log_abs_density, smoothed_density
from .stability import (
    edge_distance,
    edge_of_stability,
    heavy_ball_analysis,
    nonnormal_report,
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)
from .stochastic_edge import (
    StochasticEdge,
    critical_learning_rate,
    stochastic_edge,
    stochastic_edge_from_density,
)
from .structure import SpectrumStructure, spectrum_structure

__all__ = [
    "BlockSpectra",
    "GradientOverlap",
    "LogAbsDensity",
    "SpectrumStructure",
    "StochasticEdge",
    "block_spectra",
    "critical_learning_rate",
    "default_groups",
    "edge_distance",
    "edge_of_stability",
    "full_gradient",
    "gradient_overlap",
    "heavy_ball_analysis",
    "log_abs_density",
    "nonnormal_report",
    "preconditioned_sharpness",
    "resolve_groups",
    "sharpness",
    "smoothed_density",
    "spectrum_structure",
    "stability_threshold",
    "stochastic_edge",
    "stochastic_edge_from_density",
    "subspace_overlap",
]
