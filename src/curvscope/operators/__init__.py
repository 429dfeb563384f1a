"""Curvature operators on the flat parameter vector (they know PyTorch models)."""

from .base import CurvatureOperator
from .ggn import GGNOperator, ResidualOperator
from .hessian import HessianOperator

__all__ = ["CurvatureOperator", "GGNOperator", "HessianOperator", "ResidualOperator"]
