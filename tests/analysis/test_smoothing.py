"""Smoothing conventions and the log|lambda| density against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from planted import PLANTED, density_of, with_outliers

from curvscope.analysis import log_abs_density, smoothed_density, spectrum_structure
from curvscope.analysis.smoothing import papyan_map, papyan_sigma
from curvscope.linalg import SpectralDensity

# ---------------------------------------------------------------------------------------------
# Smoothing conventions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_density() -> SpectralDensity:
    return density_of(with_outliers("marchenko-pastur", 5, PLANTED), 40, 4, 5)


@pytest.mark.parametrize("convention", ["ghorbani", "papyan"])
def test_smoothed_density_integrates_to_one_and_keeps_the_mean(planted_density, convention):
    grid, density = smoothed_density(planted_density, convention, num=40_000)
    assert np.all(density >= 0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    # Gaussian smoothing keeps the first moment of the quadrature.
    mean = np.trapezoid(grid * density, grid)
    assert mean == pytest.approx(planted_density.moment(1), abs=1e-3)


def peak_sigma(grid: np.ndarray, density: np.ndarray, centre: float) -> float:
    """Standard deviation of an isolated Gaussian peak at ``centre``, from its curvature:
    log p(x) = const - (x - c)^2 / (2 s^2) near the peak."""
    near = np.abs(grid - centre) < 0.02
    coeffs = np.polyfit(grid[near] - centre, np.log(density[near]), 2)
    return float(np.sqrt(-0.5 / coeffs[0]))


def test_ghorbani_kernel_width(planted_density):
    d = planted_density
    grid = np.linspace(19.9, 20.1, 2001)
    _, density = smoothed_density(d, "ghorbani", grid=grid)
    expected = math.sqrt(1e-5 * max(1.0, d.lambda_max - d.lambda_min))
    assert peak_sigma(grid, density, 20.0) == pytest.approx(expected, rel=1e-3)


def test_papyan_kernel_width_and_map(planted_density):
    d = planted_density
    centre, half = papyan_map(d)
    lo, hi = d.lambda_min, d.lambda_max
    # [-1, 1] is [lambda_min, lambda_max] widened by 5% of the width on each side.
    assert centre - half == pytest.approx(lo - 0.05 * (hi - lo))
    assert centre + half == pytest.approx(hi + 0.05 * (hi - lo))
    sigma_t = 2.0 / (40 - 1) / math.sqrt(8.0 * math.log(3.0))
    assert papyan_sigma(40) == pytest.approx(sigma_t)
    grid = np.linspace(19.0, 21.0, 4001)
    _, density = smoothed_density(d, "papyan", grid=grid)
    assert peak_sigma(grid, density, 20.0) == pytest.approx(sigma_t * half, rel=1e-3)
    # The peak holds the outlier's quadrature mass (Jacobian 1/h applied).
    near = np.abs(grid - 20.0) < 6 * sigma_t * half
    mass = np.trapezoid(density[near], grid[near])
    assert mass == pytest.approx(spectrum_structure(d).outliers_mass[0], rel=1e-3)


def test_smoothed_density_rejects_unknown_convention(planted_density):
    with pytest.raises(ValueError, match="convention"):
        smoothed_density(planted_density, "pyhessian")
    one_step = density_of(np.linspace(0, 1, 10), 1, 2, 0)
    with pytest.raises(ValueError, match="M >= 2"):
        smoothed_density(one_step, "papyan")


# ---------------------------------------------------------------------------------------------
# log |lambda|
# ---------------------------------------------------------------------------------------------


def test_log_abs_density_moves_nodes_and_keeps_their_weights():
    """Hand-made quadrature, so every number is known: two probes, nodes over 6 decades of
    both signs, one exact zero and one round-off node."""
    nodes = np.array([[-1e-3, 0.0, 1e-2, 1.0, 100.0], [-0.5, 1e-15, 1e-4, 3.0, 100.0]])
    weights = np.array([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2, 0.1, 0.3, 0.3, 0.1]])
    d = SpectralDensity(nodes, weights, np.array([5, 5]), n=50)
    result = log_abs_density(d, eps=1e-8, num=60_000)
    assert result.threshold == pytest.approx(1e-6)
    assert result.dropped_mass == pytest.approx((0.2 + 0.1) / 2)
    grid, total = result.grid, result.density
    assert np.trapezoid(total, grid) == pytest.approx(0.85, abs=1e-6)
    assert np.trapezoid(result.density_negative, grid) == pytest.approx(0.15, abs=1e-6)
    np.testing.assert_allclose(result.density_positive + result.density_negative, total)
    kept_t = np.log10(np.abs([-1e-3, 1e-2, 1.0, 100.0, -0.5, 1e-4, 3.0, 100.0]))
    kept_w = np.array([0.1, 0.3, 0.2, 0.2, 0.2, 0.3, 0.3, 0.1]) / 2
    mean_t = np.trapezoid(grid * total, grid)
    assert mean_t == pytest.approx(np.sum(kept_w * kept_t), abs=1e-6)
    # Ghorbani's rule in decades: variance 1e-5 * max(1, span), span = 6 decades here.
    assert result.sigma == pytest.approx(math.sqrt(6e-5))
    assert grid[0] == pytest.approx(-4 - 5 * result.sigma)
    assert grid[-1] == pytest.approx(2 + 5 * result.sigma)


def test_log_abs_density_drops_a_null_space():
    """A quarter of the spectrum is exactly zero: Lanczos converges a node to it (it is the
    spectrum's end), and that node's mass, about 1/4, is what gets dropped."""
    rng = np.random.default_rng(3)
    values = np.r_[np.zeros(100), 10.0 ** rng.uniform(0, 3, 300)]
    d = density_of(values, 60, 5, 3)
    result = log_abs_density(d, eps=1e-4)
    # Per probe the null space's share is chi^2_100 / chi^2_400: sd ~0.02, ~0.01 over 5.
    assert result.dropped_mass == pytest.approx(0.25, abs=0.04)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(
        1 - result.dropped_mass, abs=1e-3
    )
    assert np.all(result.density_negative == 0)


def test_log_abs_density_of_a_zero_operator_says_what_to_do():
    d = SpectralDensity(np.zeros((1, 3)), np.full((1, 3), 1 / 3), np.array([3]), n=3)
    with pytest.raises(ValueError, match="lower eps"):
        log_abs_density(d)
