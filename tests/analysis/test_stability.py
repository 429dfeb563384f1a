"""Stability thresholds against the blocks' spectral radius and the actual recursions; the
linearised update operators against their dense definitions; reading torch optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvscope.analysis.stability import (
    block_analysis,
    edge_distance,
    edge_of_stability,
    heavy_ball_analysis,
    nonnormal_report,
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)
from curvscope.linalg.nonnormal import eigenvector_condition, spectral_radius
from curvscope.operators.lowrank import LowRankOperator
from curvscope.operators.update import (
    OptimizerConfig,
    adam_block,
    gd_block,
    heavy_ball_block,
    nesterov_block,
    optimizer_config,
    update_block,
    update_operator,
)

CONFIGS = {
    "gd": OptimizerConfig("gd", lr=0.1, weight_decay=0.05),
    "heavy_ball": OptimizerConfig("heavy_ball", lr=0.1, momentum=0.9, dampening=0.2),
    "heavy_ball_wd": OptimizerConfig("heavy_ball", lr=0.05, momentum=0.5, weight_decay=0.3),
    "nesterov": OptimizerConfig("nesterov", lr=0.1, momentum=0.9, weight_decay=0.1),
    "nesterov_small": OptimizerConfig("nesterov", lr=0.2, momentum=0.3),
    "adam": OptimizerConfig("adam", lr=1e-3, momentum=0.9, weight_decay=0.01, eps=1e-8),
    "adamw": OptimizerConfig(
        "adam", lr=1e-2, momentum=0.8, weight_decay=5.0, decoupled_weight_decay=True, eps=1e-8
    ),
}


class CountingOperator:
    """A dense symmetric matrix as an operator that counts the columns it is applied to."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.shape, self.dtype, self.device = self.matrix.shape, torch.float64, torch.device("cpu")
        self.columns = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.columns += V.shape[1]
        return self.matrix @ V


def spd(n: int, seed: int, low: float = 0.1, high: float = 3.0) -> np.ndarray:
    """Random SPD matrix with distinct eigenvalues spread over [low, high]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.linspace(low, high, n)) @ Q.T


def block_radius(config: OptimizerConfig, mu: float) -> float:
    return spectral_radius(update_block(config, mu))


def scanned_threshold(config: OptimizerConfig) -> float:
    """The first mu (in H's units, coupled weight decay added back for SGD) where the block's
    spectral radius reaches 1, found by scanning upwards from a stable point and bisecting."""
    shift = 0.0 if config.method == "adam" else config.coupled_weight_decay
    g = config.coefficients()[1]
    grid = np.linspace(1e-3, 10.0, 4001) / g  # mu from tiny to far beyond any threshold
    radii = np.array([block_radius(config, mu) for mu in grid])
    assert radii[0] < 1
    i = int(np.argmax(radii >= 1))
    lo, hi = grid[i - 1], grid[i]
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if block_radius(config, mid) < 1 else (lo, mid)
    return (lo + hi) / 2 - shift


@pytest.mark.parametrize("name", list(CONFIGS))
def test_threshold_matches_the_block_spectral_radius(name):
    config = CONFIGS[name]
    assert stability_threshold(config) == pytest.approx(scanned_threshold(config), rel=1e-9)


def test_closed_forms_of_the_thresholds():
    """The numbers the module docstring states, for one setting each."""
    eta, beta = 0.1, 0.9
    assert stability_threshold(OptimizerConfig("gd", lr=eta)) == pytest.approx(2 / eta)
    hb = OptimizerConfig("heavy_ball", lr=eta, momentum=beta)
    assert stability_threshold(hb) == pytest.approx(2 * (1 + beta) / eta)
    nag = OptimizerConfig("nesterov", lr=eta, momentum=beta)
    assert stability_threshold(nag) == pytest.approx(2 * (1 + beta) / ((1 + 2 * beta) * eta))
    adam = OptimizerConfig("adam", lr=eta, momentum=beta, eps=1e-8)
    assert stability_threshold(adam) == pytest.approx((2 + 2 * beta) / ((1 - beta) * eta))


def run_sgd(H: np.ndarray, config: OptimizerConfig, steps: int) -> float:
    """||theta_T|| / ||theta_0|| of torch.optim.SGD on 1/2 theta^T H theta."""
    Ht = torch.as_tensor(H)
    theta = torch.nn.Parameter(torch.ones(H.shape[0], dtype=torch.float64))
    opt = torch.optim.SGD(
        [theta],
        lr=config.lr,
        momentum=config.momentum,
        dampening=config.dampening,
        nesterov=config.method == "nesterov",
        weight_decay=config.weight_decay,
    )
    start = float(theta.detach().norm())
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * theta @ Ht @ theta).backward()
        opt.step()
        ratio = float(theta.detach().norm()) / start
        if not 1e-4 < ratio < 1e4:
            break
    return ratio


@pytest.mark.parametrize(
    "name", ["gd", "heavy_ball", "heavy_ball_wd", "nesterov", "nesterov_small"]
)
def test_torch_sgd_converges_below_and_diverges_above_the_threshold(name):
    """2-D quadratic, rotated, with the top Hessian eigenvalue 2% below / above the threshold."""
    config = CONFIGS[name]
    threshold = stability_threshold(config)
    Q = np.array([[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]])
    for factor, stable in ((0.98, True), (1.02, False)):
        H = (Q * np.array([0.2 * threshold, factor * threshold])) @ Q.T
        ratio = run_sgd(H, config, steps=3000)
        assert (ratio < 1e-3) if stable else (ratio > 1e3), (factor, ratio)


def run_frozen_adam(H: np.ndarray, m: np.ndarray, config: OptimizerConfig, steps: int) -> float:
    """The recursion the Adam linearisation models: m <- beta1 m + (1 - beta1) g,
    theta <- (1 - eta wd_d) theta - eta M m, with g = (H + wd_c I) theta."""
    eta, beta1 = config.lr, config.momentum
    theta = np.ones(H.shape[0])
    moment = np.zeros_like(theta)
    Hc = H + config.coupled_weight_decay * np.eye(H.shape[0])
    for _ in range(steps):
        moment = beta1 * moment + (1 - beta1) * (Hc @ theta)
        theta = (1 - eta * config.decoupled_decay) * theta - eta * m * moment
        ratio = float(np.linalg.norm(theta) / np.sqrt(H.shape[0]))
        if not 1e-4 < ratio < 1e4:
            break
    return ratio


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_frozen_adam_converges_below_and_diverges_above_the_threshold(name):
    """Non-diagonal H and a non-uniform M: the preconditioned sharpness decides."""
    config = CONFIGS[name]
    threshold = stability_threshold(config)
    rng = np.random.default_rng(5)
    m = rng.uniform(0.5, 5.0, 3)
    H0 = spd(3, seed=5)
    top = preconditioned_sharpness(H0, m, weight_decay=config.coupled_weight_decay)
    for factor, stable in ((0.98, True), (1.02, False)):
        # scale H_c = H + wd_c I so that lambda_max(M H_c) = factor * threshold
        Hc = (H0 + config.coupled_weight_decay * np.eye(3)) * (factor * threshold / top)
        H = Hc - config.coupled_weight_decay * np.eye(3)
        got = preconditioned_sharpness(H, m, weight_decay=config.coupled_weight_decay)
        assert got == pytest.approx(factor * threshold, rel=1e-10)
        ratio = run_frozen_adam(H, m, config, steps=4000)
        assert (ratio < 1e-3) if stable else (ratio > 1e3), (factor, ratio)


def test_frozen_adam_operator_is_one_step_of_the_recursion():
    config = CONFIGS["adamw"]
    H = spd(4, seed=2)
    m = np.random.default_rng(2).uniform(0.5, 2.0, 4)
    T = update_operator(H, config, preconditioner=m).dense().numpy()
    eta, beta1, wd = config.lr, config.momentum, config.decoupled_decay
    prev, moment = np.arange(1.0, 5.0), np.full(4, 0.3)
    now = (1 - eta * wd) * prev - eta * m * moment  # any consistent (theta_t, theta_{t-1})
    moment = beta1 * moment + (1 - beta1) * (H @ now)
    nxt = (1 - eta * wd) * now - eta * m * moment
    np.testing.assert_allclose(T @ np.concatenate([now, prev]), np.concatenate([nxt, now]))


def test_dense_update_operators_match_their_definitions():
    n, eta, beta = 5, 0.07, 0.8
    H = spd(n, seed=1)
    eye, zero = np.eye(n), np.zeros((n, n))
    hb = update_operator(H, OptimizerConfig("heavy_ball", lr=eta, momentum=beta)).dense()
    expected = np.block([[(1 + beta) * eye - eta * H, -beta * eye], [eye, zero]])
    np.testing.assert_allclose(hb.numpy(), expected, atol=1e-14)
    nag = update_operator(H, OptimizerConfig("nesterov", lr=eta, momentum=beta)).dense()
    step = eye - eta * H
    np.testing.assert_allclose(
        nag.numpy(), np.block([[(1 + beta) * step, -beta * step], [eye, zero]]), atol=1e-14
    )
    gd = update_operator(H, OptimizerConfig("gd", lr=eta, weight_decay=0.5)).dense()
    np.testing.assert_allclose(gd.numpy(), eye - eta * (H + 0.5 * eye), atol=1e-14)


def test_matrix_free_products_on_a_curvature_operator():
    """UpdateOperator over a real CurvatureOperator (checked dtype/shape) agrees with dense."""
    gen = torch.Generator().manual_seed(0)
    columns = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    H = LowRankOperator(columns, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    m = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    config = OptimizerConfig("adam", lr=0.01, momentum=0.9, weight_decay=0.1, eps=1e-8)
    op = update_operator(H, config, preconditioner=m)
    assert op.shape == (12, 12)
    X = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    dense = op.dense()
    torch.testing.assert_close(op.matmat(X), dense @ X)
    torch.testing.assert_close(op @ X[:, 0], dense @ X[:, 0])
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(6, 1, dtype=torch.float64))


@pytest.mark.parametrize("method", ["heavy_ball", "nesterov"])
def test_block_is_the_restriction_to_an_eigenvector_pair(method):
    n, eta, beta = 6, 0.3, 0.7
    H = spd(n, seed=4)
    config = OptimizerConfig(method, lr=eta, momentum=beta)
    T = update_operator(H, config).dense().numpy()
    values, vectors = np.linalg.eigh(H)
    make = heavy_ball_block if method == "heavy_ball" else nesterov_block
    for lam, u in zip(values, vectors.T, strict=True):
        basis = np.zeros((2 * n, 2))
        basis[:n, 0], basis[n:, 1] = u, u
        TB = T @ basis
        np.testing.assert_allclose(TB, basis @ (basis.T @ TB), atol=1e-12)  # invariant
        np.testing.assert_allclose(basis.T @ TB, make(eta, beta, lam), atol=1e-12)


def test_adam_block_is_the_restriction_to_a_preconditioned_pair():
    """With M H != H M the invariant planes are spanned by eigenvectors w = M^1/2 q of M H,
    which are not orthogonal; the block is still adam_block(mu)."""
    n = 5
    config = CONFIGS["adamw"]
    H = spd(n, seed=6)
    m = np.random.default_rng(6).uniform(0.2, 4.0, n)
    T = update_operator(H, config, preconditioner=m).dense().numpy()
    mus, qs = np.linalg.eigh(np.sqrt(m)[:, None] * H * np.sqrt(m))
    for mu, q in zip(mus, qs.T, strict=True):
        w = np.sqrt(m) * q
        basis = np.zeros((2 * n, 2))
        basis[:n, 0], basis[n:, 1] = w, w
        coords, *_ = np.linalg.lstsq(basis, T @ basis, rcond=None)
        np.testing.assert_allclose(basis @ coords, T @ basis, atol=1e-12)
        expected = adam_block(config.lr, config.momentum, mu, config.decoupled_decay)
        np.testing.assert_allclose(coords, expected, atol=1e-12)


def test_heavy_ball_verdict_kappa_and_defective_points():
    eta, beta = 0.5, 0.64
    x = np.linspace(-0.5, 2 * (1 + beta) + 0.5, 397)  # eta * lambda, avoiding the exact edges
    analysis = heavy_ball_analysis(eta, beta, x / eta)
    np.testing.assert_array_equal(analysis.stable, analysis.spectral_radius < 1)
    assert analysis.threshold == pytest.approx(2 * (1 + beta) / eta)
    for lam, kappa in zip(analysis.eigenvalues[::37], analysis.kappa[::37], strict=True):
        block = heavy_ball_block(eta, beta, lam)
        assert kappa == pytest.approx(eigenvector_condition(block), rel=1e-8)
    # defective at eta lambda = (1 -+ sqrt(beta))^2 = 0.04 and 3.24
    np.testing.assert_allclose(analysis.defective * eta, [0.04, 3.24])
    at = heavy_ball_analysis(eta, beta, analysis.defective)
    assert np.all(at.kappa > 1e6)
    for lam in analysis.defective:
        assert eigenvector_condition(heavy_ball_block(eta, beta, lam)) > 1e6
    near = heavy_ball_analysis(eta, beta, analysis.defective * (1 + 1e-3))
    assert np.all(np.isfinite(near.kappa)) and np.all(near.kappa > 10)
    # the generic analysis finds the same defective points and verdicts
    generic = block_analysis(OptimizerConfig("heavy_ball", lr=eta, momentum=beta), x / eta)
    np.testing.assert_allclose(generic.defective, analysis.defective, rtol=1e-12)
    np.testing.assert_array_equal(generic.stable, analysis.stable)


def test_nesterov_defective_points():
    """Nesterov's discriminant c ((1+beta)^2 c - 4 beta), c = 1 - eta lambda, vanishes at
    eta lambda = 1 (nilpotent block) and at 1 - 4 beta / (1 + beta)^2."""
    eta, beta = 0.1, 0.5
    analysis = block_analysis(OptimizerConfig("nesterov", lr=eta, momentum=beta), [1.0])
    expected = np.sort([1.0, 1 - 4 * beta / (1 + beta) ** 2]) / eta
    np.testing.assert_allclose(analysis.defective, expected, rtol=1e-10)
    for lam in expected:
        assert eigenvector_condition(nesterov_block(eta, beta, lam)) > 1e6


def test_preconditioned_gd_is_normal_iff_h_and_m_commute():
    """beta1 = 0 (RMSprop-like, order 1): T = I - eta M H is normal iff M H = H M."""
    n = 5
    m = np.linspace(0.5, 3.0, n)
    H_diag = np.diag(np.linspace(0.2, 2.0, n))
    H_full = spd(n, seed=7, low=0.2, high=2.0)
    config = OptimizerConfig("gd", lr=0.1)
    commuting = update_operator(H_diag, config, preconditioner=m).dense().numpy()
    rotated = update_operator(H_full, config, preconditioner=m).dense().numpy()
    assert eigenvector_condition(commuting) == pytest.approx(1.0, abs=1e-10)
    assert eigenvector_condition(rotated) > 1.1


def test_adam_with_momentum_is_orthogonally_block_diagonal_iff_commuting():
    """For beta1 > 0 every T is non-normal (its 2 x 2 blocks are), but with M H = H M it is
    orthogonally similar to diag(B(mu_i)), so its singular values are the blocks'; with
    M H != H M it is not."""
    n = 4
    config = OptimizerConfig("adam", lr=0.05, momentum=0.9, eps=1e-8)
    m = np.linspace(0.5, 3.0, n)
    for H, commutes in ((np.diag(np.linspace(0.2, 2.0, n)), True), (spd(n, 8, 0.2, 2.0), False)):
        T = update_operator(H, config, preconditioner=m).dense().numpy()
        mus = np.linalg.eigvals(m[:, None] * H).real
        blocks = update_block(config, mus)
        block_sv = np.sort(np.concatenate([np.linalg.svd(b, compute_uv=False) for b in blocks]))
        sv = np.sort(np.linalg.svd(T, compute_uv=False))
        assert np.allclose(sv, block_sv, rtol=1e-10) == commutes
        assert np.allclose(
            np.sort(np.abs(np.linalg.eigvals(T))),
            np.sort(np.abs(np.concatenate([np.linalg.eigvals(b) for b in blocks]))),
            rtol=1e-8,
        )


def test_gd_block():
    np.testing.assert_allclose(gd_block(0.1, [1.0, 30.0])[:, 0, 0], [0.9, -2.0])


def test_preconditioned_sharpness_matches_dense():
    n = 60  # large enough for the ARPACK path
    H = spd(n, seed=9)
    m = np.random.default_rng(9).uniform(0.1, 2.0, n)
    expected = np.max(np.linalg.eigvals(m[:, None] * (H + 0.2 * np.eye(n))).real)
    assert preconditioned_sharpness(H, m, weight_decay=0.2) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="shape"):
        preconditioned_sharpness(H, m[:-1])


def test_edge_distance_and_edge_of_stability():
    d = edge_distance(18.0, 20.0)
    assert (d.ratio, d.gap) == (pytest.approx(0.9), pytest.approx(2.0))
    with pytest.raises(ValueError, match="threshold"):
        edge_distance(1.0, -1.0)
    H = spd(30, seed=10, high=7.0)
    config = CONFIGS["heavy_ball_wd"]
    edge = edge_of_stability(H, config)
    assert edge.sharpness == pytest.approx(7.0, rel=1e-10)
    assert edge.threshold == pytest.approx(2 * 1.5 / 0.05 - 0.3)
    assert sharpness(H, config) == pytest.approx(7.0, rel=1e-10)
    adam = OptimizerConfig("adam", lr=1e-3, momentum=0.9, eps=1e-8, v_hat=np.full(30, 4.0))
    # M = 1 / (2 + 1e-8): a uniform preconditioner scales the sharpness
    assert sharpness(H, adam) == pytest.approx(7.0 / (2 + 1e-8), rel=1e-10)


def test_nonnormal_report_restricts_exactly_to_the_top_eigenspace():
    """Powers of the restriction equal powers of the full T on the subspace:
    ||T^k Q||_2 = ||R^k||_2 for an invariant subspace with orthonormal basis Q."""
    n, k = 30, 3
    H = spd(n, seed=11)
    m = np.random.default_rng(11).uniform(0.3, 3.0, n)
    configs = [
        (OptimizerConfig("heavy_ball", lr=1.0, momentum=0.8), None),
        (OptimizerConfig("adam", lr=1.0, momentum=0.8, eps=1e-8), m),
    ]
    for config, precond in configs:
        # put the top eigenvalue near the threshold so the powers do something interesting
        scale = (
            0.95
            * stability_threshold(config)
            / (preconditioned_sharpness(H, precond) if precond is not None else 3.0)
        )
        op = update_operator(H * scale, config, preconditioner=precond)
        report = nonnormal_report(op, k_top=k, num_steps=40, eps=[1e-3, 1e-2])
        assert report.restricted.shape == (2 * k, 2 * k)
        assert report.invariance_residual < 1e-8
        T = op.dense().numpy()
        top = report.eigenvalues
        # rebuild an orthonormal basis of the same subspace independently
        if precond is None:
            _, U = np.linalg.eigh(H * scale)
            W = U[:, -k:]
        else:
            root = np.sqrt(precond)
            _, U = np.linalg.eigh(root[:, None] * H * scale * root)
            W = root[:, None] * U[:, -k:]
        Z = np.zeros_like(W)
        B, _ = np.linalg.qr(np.block([[W, Z], [Z, W]]))
        P = B.copy()
        measured = [1.0]
        for _ in range(40):
            P = T @ P
            measured.append(np.linalg.norm(P, 2))
        np.testing.assert_allclose(report.bounds.power_norms, measured, rtol=1e-8)
        blocks = update_block(config, top)
        assert report.bounds.rho == pytest.approx(max(spectral_radius(b) for b in blocks), rel=1e-8)


def test_nonnormal_report_with_lanczos_matches_arpack_with_fewer_products():
    H = spd(200, seed=3)
    config = OptimizerConfig("heavy_ball", lr=1.0, momentum=0.9)
    H = H * (0.9 * stability_threshold(config) / np.linalg.eigvalsh(H)[-1])
    counts = {}
    reports = {}
    for solver in ("arpack", "lanczos"):
        counting = CountingOperator(H)
        reports[solver] = nonnormal_report(
            update_operator(counting, config),
            k_top=3,
            num_steps=20,
            eps=[1e-2],
            tol=1e-6,
            eigensolver=solver,
        )
        counts[solver] = counting.columns
    a, b = reports["arpack"], reports["lanczos"]
    np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-9)
    assert b.bounds.rho == pytest.approx(a.bounds.rho, rel=1e-9)
    assert b.invariance_residual < 1e-4
    assert counts["lanczos"] < counts["arpack"]


def test_nonnormal_report_on_a_dense_matrix():
    T = np.array([[0.9, 5.0], [0.0, 0.8]])
    report = nonnormal_report(T, num_steps=100)
    assert report.invariance_residual < 1e-14
    assert report.bounds.transient_growth


# ---- reading torch optimizers ----------------------------------------------------------------


def quadratic_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    for t in range(steps):
        opt.zero_grad()
        loss = sum(((t + 1.0) * p**2 + p).sum() for p in params)
        loss.backward()
        opt.step()


def test_optimizer_config_reads_sgd():
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    plain = optimizer_config(torch.optim.SGD([w, b], lr=0.1))
    assert (plain.method, plain.lr, plain.momentum) == ("gd", 0.1, 0.0)
    hb = optimizer_config(
        torch.optim.SGD([w, b], lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-4)
    )
    assert (hb.method, hb.momentum, hb.dampening, hb.weight_decay) == (
        "heavy_ball",
        0.9,
        0.1,
        1e-4,
    )
    assert not hb.decoupled_weight_decay and hb.v_hat is None
    nag = optimizer_config(torch.optim.SGD([w, b], lr=0.05, momentum=0.8, nesterov=True), [b])
    assert (nag.method, nag.momentum) == ("nesterov", 0.8)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_config_reads_adam_state(cls, amsgrad):
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = cls([w, b], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, amsgrad=amsgrad)
    before = optimizer_config(opt, [w, b])
    assert before.v_hat is None
    with pytest.raises(ValueError, match="step"):
        before.preconditioner()
    quadratic_steps(opt, [w, b], 3)
    config = optimizer_config(opt, [b, w])  # flat order follows params, not the optimizer
    assert config.method == "adam" and config.step == 3
    assert (config.lr, config.momentum, config.beta2, config.eps) == (3e-3, 0.8, 0.95, 1e-6)
    assert config.decoupled_weight_decay == (cls is torch.optim.AdamW)
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    expected = torch.cat([opt.state[p][key].reshape(-1) for p in (b, w)]).double().numpy()
    np.testing.assert_allclose(config.v_hat, expected / (1 - 0.95**3), rtol=1e-12)
    np.testing.assert_allclose(
        config.preconditioner(), 1 / (np.sqrt(expected / (1 - 0.95**3)) + 1e-6), rtol=1e-12
    )


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_optimizer_config_reads_the_coming_adam_step(cls, amsgrad, steps_before):
    """upcoming=True, read with the gradients in p.grad, gives the v_hat and step that the
    default reading finds after optimizer.step(): also before the first step."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = cls([w, b], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, amsgrad=amsgrad)
    quadratic_steps(opt, [w, b], steps_before)
    opt.zero_grad()
    sum(((3.0 * p) ** 3 + p).sum() for p in (w, b)).backward()
    coming = optimizer_config(opt, [b, w], upcoming=True)
    opt.step()
    after = optimizer_config(opt, [b, w])
    assert coming.step == after.step == steps_before + 1
    np.testing.assert_allclose(coming.v_hat, after.v_hat, rtol=1e-15, atol=0)
    assert coming.decoupled_weight_decay == (cls is torch.optim.AdamW)


def test_optimizer_config_upcoming_needs_gradients():
    w, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.Adam([w, b], lr=0.1)
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"positions \[1\] have no gradient"):
        optimizer_config(opt, upcoming=True)
    sgd = optimizer_config(torch.optim.SGD([w], lr=0.1), upcoming=True)
    assert sgd.method == "gd" and sgd.v_hat is None


def test_optimizer_config_errors():
    w, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match="RMSprop"):
        optimizer_config(torch.optim.RMSprop([w], lr=0.1))
    groups = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.2}], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optimizer_config(groups, [w, b])
    assert optimizer_config(groups, [b]).lr == 0.2  # one group at a time works
    other = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="not trained"):
        optimizer_config(torch.optim.SGD([w], lr=0.1), [other])
    with pytest.raises(ValueError, match="maximize"):
        optimizer_config(torch.optim.SGD([w], lr=0.1, maximize=True))
    with pytest.raises(ValueError, match="dampening"):
        OptimizerConfig("nesterov", lr=0.1, momentum=0.9, dampening=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": 0.0},
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True},
    ],
)
def test_update_operator_reproduces_torch_sgd(kwargs):
    """From its second step on, torch.optim.SGD on 1/2 theta^T H theta follows
    (theta_{t+1}, theta_t) = T (theta_t, theta_{t-1}) exactly (weight decay included)."""
    n = 4
    H = torch.as_tensor(spd(n, seed=12))
    theta = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=0.05, weight_decay=0.01, **kwargs)
    path = [theta.detach().clone()]
    for _ in range(8):
        opt.zero_grad()
        (0.5 * theta @ H @ theta).backward()
        opt.step()
        path.append(theta.detach().clone())
    op = update_operator(H, optimizer_config(opt, [theta]))
    for t in range(2, 8):
        state = torch.cat([path[t], path[t - 1]])[: op.shape[0]]
        torch.testing.assert_close(op.matvec(state)[:n], path[t + 1], rtol=1e-13, atol=1e-13)
