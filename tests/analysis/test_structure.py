"""spectrum_structure against planted spectra with known answers (tests/planted.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planted import PLANTED, N, bulk, density_of, with_outliers

from curvscope.analysis import SpectrumStructure, spectrum_structure
from curvscope.linalg import SpectralDensity

# ---------------------------------------------------------------------------------------------
# Outliers
# ---------------------------------------------------------------------------------------------


def check_planted(s: SpectrumStructure, high: np.ndarray, low: np.ndarray) -> None:
    # Converged Ritz values of isolated eigenvalues agree with them to ~1e-12 in float64;
    # 1e-6 relative is the stated promise.
    assert s.num_outliers == high.size, (s.outliers, high)
    assert s.num_outliers_low == low.size, (s.outliers_low, low)
    np.testing.assert_allclose(s.outliers, high, rtol=1e-6)
    np.testing.assert_allclose(s.outliers_low, low, rtol=1e-6)
    np.testing.assert_allclose(s.outliers_support, 1.0)
    assert s.num_unresolved == 0
    # The bulk's edges are its extreme Ritz values: inside [0, 1], near its ends.
    assert -1e-9 <= s.bulk_min < 0.1 and 0.9 < s.bulk_max <= 1.0 + 1e-9


@pytest.mark.parametrize("kind", ["marchenko-pastur", "semicircle"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("num_iters", "num_probes"), [(30, 1), (60, 6)])
def test_planted_outliers_are_found_exactly(kind, seed, num_iters, num_probes):
    values = with_outliers(kind, seed, PLANTED)
    s = spectrum_structure(density_of(values, num_iters, num_probes, seed))
    check_planted(s, PLANTED, np.array([]))
    # Each probe sees an isolated eigenvalue with weight chi^2_1 / n: mass about 1/n.
    assert np.all(s.outliers_mass < 20.0 / N)


@pytest.mark.parametrize("kind", ["marchenko-pastur", "semicircle"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("num_iters", "num_probes"), [(30, 1), (60, 6)])
def test_pure_bulk_has_no_outliers(kind, seed, num_iters, num_probes):
    s = spectrum_structure(density_of(bulk(kind, N, seed), num_iters, num_probes, seed))
    check_planted(s, np.array([]), np.array([]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    num_probes=st.sampled_from([1, 2, 5, 8]),
    num_iters=st.sampled_from([25, 40, 70]),
    kind=st.sampled_from(["marchenko-pastur", "semicircle"]),
    num_high=st.integers(0, 5),
    num_low=st.integers(0, 3),
    data=st.data(),
)
def test_property_planted_outliers_any_seed(
    seed, num_probes, num_iters, kind, num_high, num_low, data
):
    """Outliers at least one bulk width beyond the bulk, at least 10% apart: all found."""
    ratios = st.floats(1.1, 1.6)
    high, x = [], 2.0
    for _ in range(num_high):
        high.append(x)
        x *= data.draw(ratios)
    low, x = [], -1.0
    for _ in range(num_low):
        low.append(x)
        x *= data.draw(ratios)
    high, low = np.array(sorted(high, reverse=True)), np.array(sorted(low))
    values = with_outliers(kind, seed % 1000, np.r_[high, low])
    s = spectrum_structure(density_of(values, num_iters, num_probes, seed))
    check_planted(s, high, low)


def test_negative_outliers_are_reported_separately():
    high, low = np.array([8.0, 5.0]), np.array([-6.0, -3.0])
    values = with_outliers("marchenko-pastur", 7, np.r_[high, low])
    s = spectrum_structure(density_of(values, 60, 4, 7))
    check_planted(s, high, low)
    assert s.lambda_min == pytest.approx(-6.0, rel=1e-9)
    assert s.lambda_max == pytest.approx(8.0, rel=1e-9)
    assert s.abs_min_over_max == pytest.approx(6.0 / 8.0, rel=1e-9)


def test_far_outliers_on_both_sides_do_not_hide_near_ones():
    """Near outliers (one bulk width out) beside far ones on the other side: the far ones
    must not count toward the width that the near ones' gaps are measured against."""
    high, low = np.array([30.0, 2.0]), np.array([-25.0, -1.0])
    values = with_outliers("semicircle", 8, np.r_[high, low])
    check_planted(spectrum_structure(density_of(values, 50, 3, 8)), high, low)


def test_point_mass_bulk_makes_every_gap_count():
    """A null space plus a few eigenvalues (a low-rank operator): all of them are outliers."""
    values = np.r_[np.zeros(N - 4), [1.0, 1.5, 2.0, 3.0]]
    s = spectrum_structure(density_of(values, 30, 3, 0))
    np.testing.assert_allclose(s.outliers, [3.0, 2.0, 1.5, 1.0], rtol=1e-6)
    assert abs(s.bulk_max) < 1e-8 and abs(s.bulk_min) < 1e-8


def test_unconverged_ritz_values_in_a_gap_are_not_outliers():
    """A Ritz value that only one probe has (hand-made quadrature) is unresolved, not an
    outlier, and does not move the bulk edge."""
    rng = np.random.default_rng(0)
    num_probes, m = 4, 30
    nodes = np.sort(rng.uniform(0, 1, (num_probes, m)), axis=1)
    nodes[:, -1] = 10.0  # an outlier every probe converged to
    nodes[0, -2] = 4.0  # a stray in the gap, one probe only
    weights = np.full((num_probes, m), 1.0 / m)
    d = SpectralDensity(nodes, weights, np.full(num_probes, m), n=1000)
    s = spectrum_structure(d)
    np.testing.assert_allclose(s.outliers, [10.0])
    assert s.num_unresolved == 1 and s.unresolved_mass == pytest.approx(1.0 / m / num_probes)
    assert s.bulk_max < 1.0


def test_gap_factor_decides_a_near_outlier():
    values = with_outliers("semicircle", 3, np.array([1.5]))  # gap 0.5 x the bulk width
    d = density_of(values, 60, 4, 3)
    np.testing.assert_allclose(spectrum_structure(d, gap_factor=0.25).outliers, [1.5])
    assert spectrum_structure(d, gap_factor=0.6).num_outliers == 0


# ---------------------------------------------------------------------------------------------
# Negative mass
# ---------------------------------------------------------------------------------------------


def test_negative_mass_matches_the_planted_share():
    values = np.linspace(-1.0, 3.0, N)  # a quarter below zero
    d = density_of(values, 80, 10, 1)
    s = spectrum_structure(d)
    # Per probe the quadrature's mass below 0 is sum_{lambda_i<0} z_i^2 / |z|^2 up to the
    # quadrature's resolution; over 10 probes its standard deviation is about 0.007.
    assert s.negative_mass == pytest.approx(0.25, abs=0.04)
    nodes, weights = d.flat()
    assert s.negative_mass == pytest.approx(np.sum(weights[nodes < 0]), abs=1e-15)
    assert s.abs_min_over_max == pytest.approx(1.0 / 3.0, rel=1e-8)


def test_negative_mass_band_ignores_round_off_around_a_null_space():
    values = np.r_[np.zeros(N // 2), np.linspace(1.0, 2.0, N // 2)]
    d = density_of(values, 40, 8, 2)
    nodes, _ = d.flat()
    s = spectrum_structure(d, band_rtol=1e-6)
    assert s.negative_mass_band == 0.0
    assert s.band == pytest.approx(1e-6 * nodes.max())
    # Ritz values of the null space sit at round-off, on either side of zero.
    assert np.all(nodes[nodes < 0] > -1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_band_resolves_negative_mass_beside_a_null_space(seed):
    """60% zeros inside a bulk on [-0.3, 2]: Lanczos puts the point mass's nodes a
    resolution's width to either side of 0, so the strict negative mass swings with the
    probe; below minus the resolution (the default band) the quadrature matches the
    planted share."""
    values = np.r_[np.zeros(240), np.linspace(-0.3, 2.0, 160)]
    s = spectrum_structure(density_of(values, 30, 3, seed))
    assert s.band == pytest.approx(0.55 * 2.3 * 2 / 29 / math.sqrt(8 * math.log(3)), rel=1e-3)
    # Three probes: the quadrature's mass below -band has a standard deviation ~0.01.
    assert s.negative_mass_band == pytest.approx(np.mean(values < -s.band), abs=0.025)


def test_structure_round_trips(tmp_path):
    values = with_outliers("marchenko-pastur", 4, np.array([9.0, 4.0, -2.0]))
    s = spectrum_structure(density_of(values, 40, 3, 4))
    assert s.num_outliers == 2 and s.num_outliers_low == 1
    s.save(tmp_path / "structure")
    loaded = SpectrumStructure.load(tmp_path / "structure")
    again = SpectrumStructure.from_dict(s.to_dict())
    for other in (loaded, again):
        for name in s.__dataclass_fields__:
            a, b = getattr(s, name), getattr(other, name)
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
            else:
                assert a == b, name
    assert "outliers above the bulk: 2" in s.summary()


def test_structure_rejects_bad_parameters():
    d = density_of(np.linspace(0, 1, 50), 10, 1, 0)
    with pytest.raises(ValueError, match="gap_factor"):
        spectrum_structure(d, gap_factor=0)
    with pytest.raises(ValueError, match="max_outlier_mass"):
        spectrum_structure(d, max_outlier_mass=1.5)
