"""The stochastic edge of stability: K = 1 separates convergence from divergence of SGD on
least squares with Gaussian features, far below the deterministic edge 2 / lambda_max."""

import numpy as np
import pytest

from curvscope.analysis.stochastic_edge import (
    critical_learning_rate,
    stochastic_edge,
    stochastic_edge_from_density,
)
from curvscope.linalg import spectral_density


def run_sgd(eigenvalues: np.ndarray, eta: float, batch_size: int, steps: int, seed: int) -> float:
    """||e|| after ``steps`` of SGD on (1/2) E[(x.e)^2], x ~ N(0, diag(eigenvalues))."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt(eigenvalues)
    e = np.ones(eigenvalues.size) / np.sqrt(eigenvalues.size)
    for _ in range(steps):
        X = rng.standard_normal((batch_size, eigenvalues.size)) * scale
        e = e - eta / batch_size * X.T @ (X @ e)
    return float(np.linalg.norm(e))


@pytest.mark.parametrize("batch_size", [2, 8, 32])
def test_sgd_diverges_within_five_percent_of_k_equals_one(batch_size):
    eigenvalues = np.random.default_rng(0).uniform(0.1, 1.0, 400)
    eta_c = critical_learning_rate(eigenvalues, batch_size)
    # The edge is the coupling K, not a single mode: eta_c is far below 2 / lambda_max.
    assert eta_c < 0.2 * 2.0 / eigenvalues.max()
    assert stochastic_edge(eigenvalues, eta_c, batch_size).K == pytest.approx(1.0, rel=1e-9)
    below = [run_sgd(eigenvalues, 0.95 * eta_c, batch_size, 4000, seed) for seed in range(2)]
    above = [run_sgd(eigenvalues, 1.05 * eta_c, batch_size, 4000, seed) for seed in range(2)]
    assert max(below) < 0.5, below  # started at norm 1: contracted
    assert min(above) > 2.0, above  # grew


def test_k_matches_trace_approximation_for_small_steps():
    eigenvalues = np.random.default_rng(1).uniform(0.0, 2.0, 300)
    edge = stochastic_edge(eigenvalues, eta=1e-4, batch_size=4)
    assert edge.K == pytest.approx(edge.K_trace, rel=1e-3)
    assert edge.stable


def test_mode_condition_makes_k_infinite():
    eigenvalues = np.array([1.0, 2.0])
    edge = stochastic_edge(eigenvalues, eta=0.7, batch_size=1)  # 0.7 * 2 * 2 = 2.8 > 2
    assert not edge.stable and np.isinf(edge.K)


def test_k_from_density_matches_exact_eigenvalues():
    rng = np.random.default_rng(2)
    n = 200
    eigenvalues = rng.uniform(0.0, 1.0, n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    density = spectral_density((Q * eigenvalues) @ Q.T, num_iters=60, num_probes=20, seed=0)
    exact = stochastic_edge(eigenvalues, 0.05, 8).K
    estimate = stochastic_edge_from_density(density, 0.05, 8).K
    # K is a smooth spectral sum: SLQ's error is the probes' sampling error (~ 1/sqrt(n P)).
    assert estimate == pytest.approx(exact, rel=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="learning rate"):
        stochastic_edge(np.ones(3), eta=0.0, batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        stochastic_edge(np.ones(3), eta=0.1, batch_size=0)
