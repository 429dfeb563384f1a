"""Non-normal numerics against closed forms (normal matrices, 2 x 2 Jordan-like blocks) and the
Kreiss / kappa(V) sandwich on random non-normal matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvscope.linalg.nonnormal import (
    TransientBounds,
    eigenvector_condition,
    kreiss_lower_bound,
    power_norms,
    pseudospectral_radius,
    sigma_min,
    spectral_radius,
    transient_bounds,
)


def normal_matrix(seed: int) -> np.ndarray:
    """Q diag(blocks) Q^T with one rotation-scaling 2 x 2 block (complex pair) and distinct
    real eigenvalues: a real normal matrix that is not symmetric."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    r, phi = 0.8, 0.7
    D = np.zeros((5, 5))
    D[:2, :2] = r * np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    D[2:, 2:] = np.diag([0.5, -0.3, 0.1])
    return Q @ D @ Q.T


def test_normal_matrix_has_kappa_one_and_powers_rho_k():
    T = normal_matrix(0)
    assert np.linalg.norm(T @ T.T - T.T @ T) < 1e-12  # really normal
    assert spectral_radius(T) == pytest.approx(0.8, rel=1e-12)
    # tolerance: LAPACK eigenvectors of a normal matrix are orthogonal to rounding
    assert eigenvector_condition(T) == pytest.approx(1.0, abs=1e-10)
    norms = power_norms(T, 30)
    np.testing.assert_allclose(norms, 0.8 ** np.arange(31), rtol=1e-10)
    # The eps-pseudospectrum of a normal matrix is the union of eps-discs around its
    # eigenvalues, so rho_eps = rho + eps.
    for eps in (1e-3, 0.05, 0.3):
        assert pseudospectral_radius(T, eps) == pytest.approx(0.8 + eps, rel=1e-9)
    bounds = transient_bounds(T, num_steps=30)
    assert bounds.measured_max == pytest.approx(1.0)
    assert bounds.measured_argmax == 0
    assert not bounds.transient_growth


def test_jordan_block_closed_forms():
    """J = [[a, c], [0, a]]: sigma_min(zI - J) = eps iff |z - a|^2 = eps^2 + c eps, so
    rho_eps = |a| + sqrt(eps^2 + c eps); J^k = [[a^k, k a^(k-1) c], [0, a^k]] whose norm is
    (|q| + sqrt(q^2 + 4 p^2)) / 2 for [[p, q], [0, p]]; and J is defective."""
    a, c = 0.9, 2.0
    J = np.array([[a, c], [0.0, a]])
    for eps in (1e-4, 1e-2, 0.2):
        expected = a + np.sqrt(eps**2 + c * eps)
        assert pseudospectral_radius(J, eps) == pytest.approx(expected, rel=1e-9)
        assert kreiss_lower_bound(J, eps) == pytest.approx((expected - 1) / eps, rel=1e-8)
    k = np.arange(60)
    p, q = a**k, k * a ** np.maximum(k - 1, 0) * c
    np.testing.assert_allclose(power_norms(J, 59), (q + np.sqrt(q**2 + 4 * p**2)) / 2, rtol=1e-12)
    assert eigenvector_condition(J) > 1e6


def test_power_norms_do_not_overflow_far_beyond_the_float_range():
    """J^k of a Jordan block with |a| = 3 passes 1e308 near k = 640: the norms follow the
    closed form in the log domain to the end, the linear values become inf, never NaN, and
    transient_bounds still reports (the old repeated product failed in the SVD at k ~ 650)."""
    a, c, K = 3.0, 2.0, 2000
    J = np.array([[a, c], [0.0, a]])
    k = np.arange(K + 1)
    # ||[[p, q], [0, p]]|| = (|q| + sqrt(q^2 + 4p^2)) / 2 with p = a^k, q = k a^(k-1) c:
    # in logs, k ln a + ln((r + sqrt(r^2 + 4)) / 2) with r = k c / a.
    r = k * c / a
    expected = k * np.log(a) + np.log((r + np.sqrt(r**2 + 4)) / 2)
    logs = power_norms(J, K, log=True)
    np.testing.assert_allclose(logs, expected, rtol=1e-12)
    norms = power_norms(J, K)
    assert not np.isnan(norms).any()
    finite = expected < np.log(np.finfo(float).max)
    np.testing.assert_allclose(norms[finite], np.exp(expected[finite]), rtol=1e-10)
    assert np.isinf(norms[~finite]).all() and (~finite).sum() > 1000
    bounds = transient_bounds(J, num_steps=K, eps=[1e-2])
    assert bounds.measured_max == np.inf and bounds.rho == pytest.approx(3.0)


def test_power_norms_of_a_nilpotent_matrix_are_zero_after_it_vanishes():
    N = np.array([[0.0, 5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(power_norms(N, 4), [1.0, 5.0, 0.0, 0.0, 0.0])
    assert power_norms(N, 3, log=True)[2] == -np.inf


@pytest.mark.parametrize("gap", [1e-1, 1e-3, 1e-5])
def test_near_jordan_kappa_closed_form(gap):
    """[[a, c], [0, a + gap]] has unit eigenvectors (1, 0) and (c, gap)/s at an angle with
    cos = c / s, s = sqrt(c^2 + gap^2); with unit columns kappa = sqrt((1 + cos)/(1 - cos))."""
    a, c = 0.5, 1.0
    T = np.array([[a, c], [0.0, a + gap]])
    cos = c / np.hypot(c, gap)
    expected = np.sqrt((1 + cos) / (1 - cos))
    # tolerance: eigenvectors lose about kappa * machine eps of relative accuracy
    assert eigenvector_condition(T) == pytest.approx(expected, rel=1e-6)


def test_pseudospectral_radius_is_the_outermost_point():
    """Brute-force check on a random non-normal matrix: nothing of the eps-pseudospectrum
    lies just outside rho_eps, and something lies just inside."""
    rng = np.random.default_rng(3)
    T = rng.standard_normal((6, 6)) + 3 * np.triu(rng.standard_normal((6, 6)), 1)
    T /= 1.05 * spectral_radius(T)
    eps = 0.02
    r = pseudospectral_radius(T, eps)
    angles = np.linspace(0, 2 * np.pi, 4000, endpoint=False)
    outside = [sigma_min(r * (1 + 1e-3) * np.exp(1j * t), T) for t in angles]
    inside = [sigma_min(r * (1 - 1e-3) * np.exp(1j * t), T) for t in angles]
    assert min(outside) > eps
    assert min(inside) < eps
    assert r >= spectral_radius(T) + eps - 1e-12


def test_complex_matrix_and_torch_input():
    T = np.array([[0.5j, 1.0], [0.0, -0.4]])
    eps = 0.05
    r = pseudospectral_radius(T, eps)
    angles = np.linspace(0, 2 * np.pi, 3000, endpoint=False)
    assert min(sigma_min(r * 1.001 * np.exp(1j * t), T) for t in angles) > eps
    assert min(sigma_min(r * 0.999 * np.exp(1j * t), T) for t in angles) < eps
    real = torch.tensor([[0.5, 1.0], [0.0, 0.2]], dtype=torch.float64)
    assert spectral_radius(real) == pytest.approx(0.5)


def non_normal(seed: int, n: int, skew: float, rho: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((n, n)) + skew * np.triu(rng.standard_normal((n, n)), 1)
    return T * (rho / spectral_radius(T))


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 6),
    skew=st.floats(0.0, 5.0),
    rho=st.floats(0.3, 0.95),
)
def test_kreiss_and_kappa_sandwich(seed, n, skew, rho):
    """(rho_eps - 1)/eps <= sup_k ||T^k|| <= kappa(V) sup_k rho^k = kappa(V) (rho < 1)."""
    T = non_normal(seed, n, skew, rho)
    steps = 600  # rho^600 < 1e-13 for rho <= 0.95: the sup is reached well before
    norm = np.linalg.norm(T, 2)
    bounds = transient_bounds(T, num_steps=steps, eps=norm * np.array([1e-3, 1e-2, 1e-1]))
    assert bounds.rho == pytest.approx(rho, rel=1e-9)
    assert bounds.kreiss_lower <= bounds.measured_max * (1 + 1e-9)
    if np.isfinite(bounds.kappa):
        assert bounds.measured_max <= bounds.kappa * (1 + 1e-9)
        assert np.all(bounds.power_norms <= bounds.upper * (1 + 1e-9))
    assert np.all(bounds.pseudospectral_radii >= rho + bounds.eps_values - 1e-12)


def test_transient_growth_is_seen_and_saved(tmp_path):
    T = np.array([[0.9, 5.0], [0.0, 0.8]])
    bounds = transient_bounds(T, num_steps=200)
    assert bounds.transient_growth
    assert bounds.kreiss_lower > 1  # the Kreiss bound alone proves growth
    assert bounds.kreiss_lower <= bounds.measured_max <= bounds.kappa
    bounds.save(tmp_path / "tb")
    loaded = TransientBounds.load(tmp_path / "tb")
    assert loaded.kappa == bounds.kappa and loaded.measured_argmax == bounds.measured_argmax
    np.testing.assert_array_equal(loaded.power_norms, bounds.power_norms)
    np.testing.assert_array_equal(loaded.kreiss, bounds.kreiss)


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        spectral_radius(np.ones((2, 3)))
    with pytest.raises(ValueError, match="eps"):
        pseudospectral_radius(np.eye(2), 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        power_norms(np.eye(2), -1)
