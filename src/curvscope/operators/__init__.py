"""Curvature operators on the flat parameter vector (they know PyTorch models)."""

from .base import CurvatureOperator
from .fisher import EmpiricalFisherOperator, FisherOperator
from .ggn import GGNOperator, ResidualOperator
from .hessian import HessianOperator

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "ResidualOperator",
]
