"""The stochastic edge of stability: the noise kernel norm K of SGD on a one-output model over
N samples, checked against the exact second-moment map of the linearised model (batches
enumerated), against dense Gauss-Newton spectra, and its SLQ estimate's standard error against
the dense K over seeds."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn

from curvscope.analysis.stochastic_edge import (
    critical_learning_rate,
    gauss_newton_eigenvalues,
    kernel_norm,
    mode_limit,
    noise_factor,
    noise_kernel_norm,
    stochastic_edge,
    stochastic_edge_from_density,
)
from curvscope.linalg import spectral_density


def batch_matrices(N: int, B: int, replacement: bool) -> list[np.ndarray]:
    """M_S = (N / B) P_S of every equally likely batch (index counts with replacement)."""
    if replacement:
        draws = itertools.product(range(N), repeat=B)
    else:
        draws = itertools.combinations(range(N), B)
    out = []
    for draw in draws:
        counts = np.bincount(np.array(draw), minlength=N).astype(float)
        out.append(np.diag(N / B * counts))
    return out


def second_moment_map(theta: np.ndarray, eta: float, B: int, replacement: bool) -> np.ndarray:
    """The exact linear map vec(Z) -> vec(E_S[A_S Z A_S^T]), A_S = I - eta Theta M_S, by
    enumerating the batches (no closure)."""
    N = theta.shape[0]
    total = np.zeros((N * N, N * N))
    batches = batch_matrices(N, B, replacement)
    for M in batches:
        A = np.eye(N) - eta * theta @ M
        total += np.kron(A, A)
    return total / len(batches)


def radius(T: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(T))))


def circulant_gram(N: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A PSD circulant Theta (samples exchangeable under cyclic shifts) and its eigenvalues."""
    rng = np.random.default_rng(seed)
    half = rng.uniform(0.05, 1.0, N // 2 + 1)
    eigenvalues = np.array([half[min(k, N - k)] for k in range(N)])
    first_row = np.real(np.fft.ifft(eigenvalues))
    theta = np.array([np.roll(first_row, k) for k in range(N)])
    return theta, eigenvalues


@pytest.mark.parametrize("N,B,replacement", [(7, 2, False), (7, 3, True), (6, 1, False)])
def test_batch_noise_factor_matches_enumeration(N, B, replacement):
    # E[M Z M] = (1 - gamma) Z + gamma N diag(Z), the ingredient of the recursion (2).
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, N))
    Z = X @ X.T
    mean = np.mean([M @ Z @ M for M in batch_matrices(N, B, replacement)], axis=0)
    gamma = noise_factor(B, N, replacement)
    np.testing.assert_allclose(mean, (1 - gamma) * Z + gamma * N * np.diag(np.diag(Z)), rtol=1e-12)
    assert noise_factor(N, N) == 0.0  # full batch: no noise
    assert noise_factor(B, None) == 1.0 / B


@pytest.mark.parametrize("B,replacement", [(3, False), (2, True), (4, False)])
def test_k_equal_one_is_the_exact_edge_for_a_circulant_ntk(B, replacement):
    # With exchangeable samples the closure N diag(Z) = tr(Z) I holds at the fixed point, so
    # K = 1 is exactly where the exact second-moment map of the linear model reaches radius 1.
    N = 10
    theta, eigenvalues = circulant_gram(N, seed=B)
    eta_c = critical_learning_rate(eigenvalues, B, N, replacement)
    gamma = noise_factor(B, N, replacement)
    assert eta_c * eigenvalues.max() < 0.9 * mode_limit(gamma)  # K, not one mode, binds
    assert stochastic_edge(eigenvalues, eta_c, B, N, replacement).K == pytest.approx(1, rel=1e-9)
    assert radius(second_moment_map(theta, eta_c, B, replacement)) == pytest.approx(1, abs=1e-9)
    assert radius(second_moment_map(theta, 0.95 * eta_c, B, replacement)) < 1 - 1e-3
    assert radius(second_moment_map(theta, 1.05 * eta_c, B, replacement)) > 1 + 1e-3


@pytest.mark.parametrize("N,B,replacement", [(12, 3, False), (10, 1, False), (8, 2, True)])
def test_noise_kernel_norm_is_the_exact_edge_for_a_generic_ntk(N, B, replacement):
    # Without symmetry the closure is an approximation, K = 1^T Q 1 / N <= ||Q||, and the
    # exact second-moment map reaches radius 1 where the noise kernel's norm ||Q|| does.
    rng = np.random.default_rng(N)
    J = rng.standard_normal((N, 5 * N))
    theta = J @ J.T / N
    eigenvalues = np.linalg.eigvalsh(theta)
    eta_k = critical_learning_rate(eigenvalues, B, N, replacement)
    eta_q = brentq(lambda eta: kernel_norm(theta, eta, B, replacement) - 1, 1e-3 * eta_k, eta_k)
    assert radius(second_moment_map(theta, eta_q, B, replacement)) == pytest.approx(1, abs=1e-8)
    for eta in (0.3 * eta_k, eta_q, eta_k):
        assert kernel_norm(theta, eta, B, replacement) >= stochastic_edge(
            eigenvalues, eta, B, N, replacement
        ).K * (1 - 1e-12)
    assert 0.7 * eta_k < eta_q < eta_k  # the closure misses by up to ~25% at 8-12 samples


def test_kernel_norm_equals_k_for_exchangeable_samples_and_matches_large_n():
    theta, eigenvalues = circulant_gram(10, seed=0)
    edge = stochastic_edge(eigenvalues, 0.3, 3, 10)
    assert kernel_norm(theta, 0.3, 3) == pytest.approx(edge.K, rel=1e-10)
    # Lanczos (N > 24) against the dense kernel (N <= 24): blocks of a 30-sample circulant.
    big, big_eigenvalues = circulant_gram(30, seed=1)
    big_k = stochastic_edge(big_eigenvalues, 0.3, 3, 30).K
    assert kernel_norm(big, 0.3, 3) == pytest.approx(big_k, rel=1e-8)


def test_k_matches_trace_form_for_small_steps_and_vanishes_at_full_batch():
    eigenvalues = np.random.default_rng(1).uniform(0.0, 2.0, 300)
    edge = stochastic_edge(eigenvalues, eta=1e-4, batch_size=4, num_samples=300)
    assert edge.K == pytest.approx(edge.K_trace, rel=1e-3)
    assert edge.K_trace == pytest.approx(noise_factor(4, 300) * 1e-4 * eigenvalues.sum() / 2)
    assert edge.stable and edge.K_std_error == 0.0
    full = stochastic_edge(eigenvalues, eta=0.5, batch_size=300, num_samples=300)
    assert full.K == 0.0 and full.max_diagonal == pytest.approx(0.5 * eigenvalues.max() / 2)
    assert critical_learning_rate(eigenvalues, 300, 300) == pytest.approx(2 / eigenvalues.max())


def test_mode_condition():
    eigenvalues = np.array([1.0, 2.0])
    edge = stochastic_edge(eigenvalues, eta=1.5, batch_size=4)  # (1 - 1/4) 1.5 * 2 > 2
    assert not edge.stable and np.isinf(edge.K) and edge.max_diagonal > 1
    assert mode_limit(0.25) == pytest.approx(2 / 0.75)
    # B = 1 (gamma = 1): d_a = 1 - 2 eta lambda_a < 1 always; only K = eta tr / 2 binds, and
    # the exact map agrees even where eta lambda_max > 1 (d_a < -1 is a closure artifact).
    assert mode_limit(1.0) == np.inf
    assert critical_learning_rate(np.array([1.0, 0.5]), 1, None) == pytest.approx(2 / 1.5)
    eigs = np.array([1.5] + [0.05] * 5)
    first_row = np.real(np.fft.ifft(eigs))
    theta = np.array([np.roll(first_row, k) for k in range(6)])
    assert stochastic_edge(eigs, 1.0, 1, 6).stable
    assert radius(second_moment_map(theta, 1.0, 1, False)) < 1


class Net(nn.Module):
    def __init__(self, outputs: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, outputs))

    def forward(self, x):
        return self.body(x)


def problem(N: int = 48, outputs: int = 1, seed: int = 0):
    model = Net(outputs, seed).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(N, outputs, generator=generator, dtype=torch.float64)
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, N, 16)]
    return model, data, x


def dense_gauss_newton(model: nn.Module, x: torch.Tensor, scale: float) -> np.ndarray:
    """Eigenvalues of scale * J^T J / N from the per-sample Jacobian by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0, 0]

    grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(params, x)
    J = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)
    G = scale * J.T @ J / x.shape[0]
    return np.sort(np.linalg.eigvalsh(G.numpy()))[::-1]


def half_mse(outputs, targets):
    return 0.5 * F.mse_loss(outputs, targets)


def test_exact_k_matches_the_dense_gauss_newton_matrix():
    model, data, x = problem()
    dense = dense_gauss_newton(model, x, scale=2.0)  # F.mse_loss: G = (2/N) J^T J
    values, N = gauss_newton_eigenvalues(model, F.mse_loss, data)
    assert N == 48
    np.testing.assert_allclose(values, dense[:48], rtol=1e-9, atol=1e-12 * dense[0])
    eta = 0.5 * critical_learning_rate(dense, 4, 48)
    edge = noise_kernel_norm(model, F.mse_loss, data, eta, 4, method="exact")
    reference = stochastic_edge(dense, eta, 4, 48)
    assert edge.K == pytest.approx(reference.K, rel=1e-10) and edge.K_std_error == 0.0
    # ||Q|| (6) from the same Gram matrix: the exact edge of the linearised model, >= K.
    assert reference.K <= edge.kernel_norm < np.inf
    assert edge.meta["method"] == "exact" and edge.meta["num_samples"] == 48
    # The loss's scale is absorbed by G: half the squared error at twice the learning rate
    # is the same SGD and has the same K.
    half = noise_kernel_norm(model, half_mse, data, 2 * eta, 4, method="exact")
    assert half.K == pytest.approx(edge.K, rel=1e-10)


def test_residual_update_of_torch_sgd_is_the_one_k_is_built_on():
    # (1): one torch.optim.SGD step on F.mse_loss over a batch S of a linear model moves the
    # residuals by -eta Theta M_S z with Theta = (2/N) X X^T.
    torch.manual_seed(0)
    N, B, eta = 12, 3, 0.05
    X, y = torch.randn(N, 20, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64)
    model = nn.Linear(20, 1, bias=False).double()
    z = (model(X) - y).detach()
    S = torch.tensor([1, 5, 7])
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    F.mse_loss(model(X[S]), y[S]).backward()
    optimizer.step()
    M = torch.zeros(N, N, dtype=torch.float64)
    M[S, S] = N / B
    theta = 2 * X @ X.T / N
    expected = z - eta * theta @ M @ z
    torch.testing.assert_close((model(X) - y).detach(), expected, rtol=1e-12, atol=1e-12)


def test_slq_standard_error_covers_the_dense_k():
    model, data, x = problem()
    dense = dense_gauss_newton(model, x, scale=2.0)
    eta = 0.6 * critical_learning_rate(dense, 4, 48)
    reference = stochastic_edge(dense, eta, 4, 48)
    within, relative = 0, []
    for seed in range(20):
        edge = noise_kernel_norm(
            model, F.mse_loss, data, eta, 4, method="slq", num_deflate=3, num_probes=8,
            num_iters=20, seed=seed,
        )  # fmt: skip
        within += abs(edge.K - reference.K) <= 3 * edge.K_std_error
        relative.append(edge.K_std_error / edge.K)
        assert abs(edge.K_trace - reference.K_trace) <= 5 * edge.K_trace_std_error
    assert within >= 18, within
    assert 1e-4 < np.median(relative) < 0.1, relative  # an error bar, neither 0 nor useless


def test_density_standard_error_covers_k_over_probe_seeds():
    rng = np.random.default_rng(2)
    n = 300
    eigenvalues = np.concatenate([rng.exponential(0.1, n - 3), [3.0, 2.0, 1.5]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = (Q * eigenvalues) @ Q.T
    exact = stochastic_edge(eigenvalues, 0.2, 8, 1000)
    within = 0
    for seed in range(20):
        density = spectral_density(matrix, num_iters=40, num_probes=6, seed=seed)
        estimate = stochastic_edge_from_density(density, 0.2, 8, 1000)
        within += abs(estimate.K - exact.K) <= 3 * estimate.K_std_error
    assert within >= 18, within


def test_several_outputs_are_refused():
    model, data, _ = problem(outputs=3)
    with pytest.raises(ValueError, match="one output per sample; this model has 3"):
        noise_kernel_norm(model, F.mse_loss, data, 0.1, 4)
    with pytest.raises(ValueError, match="one output per sample"):
        gauss_newton_eigenvalues(model, F.mse_loss, data)


def test_bad_arguments():
    with pytest.raises(ValueError, match="learning rate"):
        stochastic_edge(np.ones(3), eta=0.0, batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        stochastic_edge(np.ones(3), eta=0.1, batch_size=0)
    with pytest.raises(ValueError, match="exceeds the 5 samples"):
        stochastic_edge(np.ones(3), eta=0.1, batch_size=8, num_samples=5)
    model, data, _ = problem()
    with pytest.raises(ValueError, match="method"):
        noise_kernel_norm(model, F.mse_loss, data, 0.1, 4, method="dense")


def test_tracker_measurement_matches_the_function_and_refuses_several_outputs(tmp_path):
    from curvscope.tracking import Tracker, load_run

    model, data, _ = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = Tracker(
        tmp_path / "run",
        F.mse_loss,
        data,
        schedule="steps:1",
        measurements=("stochastic_edge",),
        progress=False,
        extra={"batch_size": 4},
    )
    for step in range(2):
        x, y = data[step]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        tracker.step(step, model, optimizer)
    scalars = load_run(tmp_path / "run").scalars
    direct = noise_kernel_norm(model, F.mse_loss, data, 0.05, 4)
    assert scalars["stochastic_K"][-1] == pytest.approx(direct.K, rel=1e-10)
    assert scalars["stochastic_kernel_norm"][-1] == pytest.approx(direct.kernel_norm, rel=1e-8)
    assert scalars["stochastic_K_std_error"][-1] == 0.0  # "auto" chose the exact method
    wide, wide_data, _ = problem(outputs=3)
    refusing = Tracker(
        tmp_path / "wide",
        F.mse_loss,
        wide_data,
        schedule="steps:0",
        measurements=("stochastic_edge",),
        progress=False,
        extra={"batch_size": 4},
    )
    with pytest.raises(ValueError, match="one output per sample"):
        refusing.step(0, wide, torch.optim.SGD(wide.parameters(), lr=0.05))
