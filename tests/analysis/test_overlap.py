"""Gradient concentration and subspace overlaps against dense eigendecompositions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cases import tiny_problem

from curvscope.analysis import (
    GradientOverlap,
    full_gradient,
    gradient_overlap,
    subspace_overlap,
)
from curvscope.linalg import DenseOperator, Eigenpairs, top_eigenpairs
from curvscope.operators import HessianOperator

BATCH_SIZES = (8, 8, 5)  # an uneven last batch


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def planted_matrix(values: np.ndarray, seed: int) -> np.ndarray:
    Q = random_orthogonal(values.size, seed)
    return (Q * values) @ Q.T


def dense_gradient_and_hessian(model, loss_fn, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and Hessian of the mean loss over all samples, by plain autograd on a copy:
    each batch's mean loss enters with weight |b| / N; the Hessian row by row by double
    backward."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [name for name, _ in model.named_parameters()]
    total = sum(len(y) for _, y in batches)
    loss = 0.0
    for x, y in batches:
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
        loss = loss + loss_fn(out, y) * (len(y) / total)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, retain_graph=True)])
        for g in grad
    ]
    return grad.detach(), torch.stack(rows).detach()


# ---------------------------------------------------------------------------------------------
# gradient_overlap
# ---------------------------------------------------------------------------------------------


def test_overlap_matches_dense_eigendecomposition_of_a_planted_matrix():
    n, k = 60, 4
    values = np.r_[[9.0, 7.0, 5.0, 4.0], np.linspace(-1.0, 1.0, n - 4)]
    A = planted_matrix(values, seed=1)
    g = torch.as_tensor(np.random.default_rng(2).standard_normal(n))
    result = gradient_overlap(DenseOperator(torch.as_tensor(A)), g, k=k)
    evals, evecs = np.linalg.eigh(A)
    top = evecs[:, ::-1][:, :k]
    g_np = g.numpy()
    # Eigenpairs to relative residual 1e-8 with a gap of >= 1 to the rest: vectors accurate to
    # about 1e-8 * ||A|| / gap, shares to a few 1e-8.
    np.testing.assert_allclose(result.eigenvalues, evals[::-1][:k], rtol=1e-10)
    np.testing.assert_allclose(result.eigenvalues, [9.0, 7.0, 5.0, 4.0], rtol=1e-10)
    np.testing.assert_allclose(result.shares, (top.T @ g_np) ** 2 / (g_np @ g_np), atol=1e-8)
    projected = top @ (top.T @ g_np)
    assert result.overlap == pytest.approx((projected @ projected) / (g_np @ g_np), abs=1e-8)
    assert result.overlap == pytest.approx(result.shares.sum(), rel=1e-14)
    assert result.curvature == pytest.approx((g_np @ A @ g_np) / (g_np @ g_np), rel=1e-12)
    assert result.baseline == k / n and result.k == k and result.n == n
    assert result.gradient_norm == pytest.approx(np.linalg.norm(g_np))
    assert result.meta["converged"]


def test_gradient_inside_and_outside_the_top_space():
    n, k = 40, 3
    values = np.r_[[10.0, 8.0, 6.0], np.linspace(0.0, 1.0, n - 3)]
    A = planted_matrix(values, seed=3)
    op = DenseOperator(torch.as_tensor(A))
    pairs = top_eigenpairs(op, k=k)
    U = pairs.vectors
    inside = torch.as_tensor(U @ np.array([1.0, -2.0, 0.5]))
    outside = np.random.default_rng(4).standard_normal(n)
    outside = torch.as_tensor(outside - U @ (U.T @ outside))
    assert gradient_overlap(op, inside, eigenpairs=pairs).overlap == pytest.approx(1.0, abs=1e-12)
    assert gradient_overlap(op, outside, eigenpairs=pairs).overlap == pytest.approx(0.0, abs=1e-12)
    # Along an eigenvector the curvature is its eigenvalue.
    along = torch.as_tensor(U[:, 1].copy())
    assert gradient_overlap(op, along, eigenpairs=pairs).curvature == pytest.approx(8.0, rel=1e-9)


def test_random_vector_scores_k_over_n():
    n, k, draws = 200, 10, 300
    A = planted_matrix(np.linspace(0.0, 5.0, n), seed=5)
    op = DenseOperator(torch.as_tensor(A))
    pairs = top_eigenpairs(op, k=k)
    rng = np.random.default_rng(6)
    overlaps = [
        gradient_overlap(op, torch.as_tensor(rng.standard_normal(n)), eigenpairs=pairs).overlap
        for _ in range(draws)
    ]
    # The overlap of a uniform direction is Beta(k/2, (n-k)/2): mean k/n, variance
    # 2 (k/n)(1 - k/n) / (n + 2); the mean of 300 draws is within 4 standard errors.
    mean, sd = k / n, math.sqrt(2 * (k / n) * (1 - k / n) / (n + 2))
    assert abs(np.mean(overlaps) - mean) < 4 * sd / math.sqrt(draws)


def test_given_eigenpairs_cost_one_product_and_k_defaults():
    n = 30
    A = planted_matrix(np.linspace(-1.0, 4.0, n), seed=7)
    op = DenseOperator(torch.as_tensor(A))
    pairs = top_eigenpairs(op, k=5)
    g = torch.as_tensor(np.random.default_rng(8).standard_normal(n))
    before = op.num_products
    result = gradient_overlap(op, g, eigenpairs=pairs)
    assert op.num_products - before == 1  # only g^T A g
    assert result.k == 5  # all given pairs
    assert gradient_overlap(op, g, num_classes=3, eigenpairs=pairs).k == 3
    assert gradient_overlap(op, g, num_classes=3, eigenpairs=pairs).overlap == pytest.approx(
        np.sum(result.shares[:3])
    )
    with pytest.raises(ValueError, match="pass k"):
        gradient_overlap(op, g)
    with pytest.raises(ValueError, match="shape"):
        gradient_overlap(op, g[:-1], k=2)
    with pytest.raises(ValueError, match="squared norm"):
        gradient_overlap(op, torch.zeros(n, dtype=torch.float64), k=2)


def test_overlap_round_trips(tmp_path):
    A = planted_matrix(np.linspace(0.0, 3.0, 20), seed=9)
    g = torch.as_tensor(np.random.default_rng(10).standard_normal(20))
    result = gradient_overlap(A, g, k=2)
    result.save(tmp_path / "overlap")
    loaded = GradientOverlap.load(tmp_path / "overlap")
    np.testing.assert_array_equal(loaded.shares, result.shares)
    np.testing.assert_array_equal(loaded.eigenvalues, result.eigenvalues)
    for name in ("k", "n", "overlap", "baseline", "curvature", "gradient_norm"):
        assert getattr(loaded, name) == getattr(result, name)


# ---------------------------------------------------------------------------------------------
# full_gradient and a real Hessian
# ---------------------------------------------------------------------------------------------


def test_full_gradient_is_the_mean_loss_gradient_and_leaves_the_model_alone():
    model, loss_fn, batches = tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, loss_fn, batches)
    rng_state = torch.get_rng_state()
    g = full_gradient(op)
    dense_g, _ = dense_gradient_and_hessian(model, loss_fn, batches)
    assert g.shape == (op.shape[0],) and g.dtype == op.dtype
    torch.testing.assert_close(g, dense_g, rtol=1e-12, atol=1e-14)
    # Weighting by batch size matters here: the unweighted batch mean differs.
    unweighted = torch.stack(
        [dense_gradient_and_hessian(model, loss_fn, [b])[0] for b in batches]
    ).mean(0)
    assert (unweighted - dense_g).norm() > 1e-3 * dense_g.norm()
    assert torch.equal(torch.get_rng_state(), rng_state)
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0) and p.grad is None


def test_overlap_on_a_tiny_mlp_hessian_matches_dense():
    model, loss_fn, batches = tiny_problem()
    op = HessianOperator(model, loss_fn, batches)
    g = full_gradient(op)
    _, H = dense_gradient_and_hessian(model, loss_fn, batches)
    evals, evecs = np.linalg.eigh(H.numpy())
    top = evecs[:, ::-1][:, :3]
    result = gradient_overlap(op, g, num_classes=3)
    g_np = g.numpy()
    np.testing.assert_allclose(result.eigenvalues, evals[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(result.shares, (top.T @ g_np) ** 2 / (g_np @ g_np), atol=1e-7)
    assert result.curvature == pytest.approx(
        float(g_np @ H.numpy() @ g_np) / float(g_np @ g_np), rel=1e-10
    )
    assert result.baseline == 3 / 31


def test_full_gradient_refuses_a_plain_matrix():
    with pytest.raises(TypeError, match="pass the gradient yourself"):
        full_gradient(DenseOperator(torch.eye(3, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# subspace_overlap
# ---------------------------------------------------------------------------------------------


def test_subspace_overlap_identical_orthogonal_and_rotated():
    n, k = 50, 4
    Q = random_orthogonal(n, 11)
    U, V = Q[:, :k], Q[:, k : 2 * k]
    assert subspace_overlap(U, U) == pytest.approx(1.0, abs=1e-14)
    assert subspace_overlap(U, V) == pytest.approx(0.0, abs=1e-14)
    # The same subspace in another basis (and as a tensor) is still the same subspace.
    R = random_orthogonal(k, 12)
    assert subspace_overlap(U, torch.as_tensor(U @ R)) == pytest.approx(1.0, abs=1e-13)
    # Turn one basis vector by theta toward V's first: tr(P1 P2) = k - 1 + cos^2 theta.
    theta = 0.3
    W = U.copy()
    W[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * V[:, 0]
    expected = (k - 1 + math.cos(theta) ** 2) / k
    assert subspace_overlap(U, W) == pytest.approx(expected, abs=1e-13)
    # A subspace inside a larger one: normalised by the smaller dimension.
    assert subspace_overlap(U[:, :2], Q[:, :6]) == pytest.approx(1.0, abs=1e-14)
    assert subspace_overlap(U, Q[:, 2:6], k=2) == pytest.approx(0.0, abs=1e-14)


def test_subspace_overlap_of_eigenpairs_and_checks():
    A = planted_matrix(np.r_[[5.0, 4.0, 3.0], np.linspace(0, 1, 27)], seed=13)
    pairs = top_eigenpairs(A, k=3)
    other = Eigenpairs(
        pairs.values, pairs.vectors[:, ::-1].copy(), pairs.residuals, pairs.converged
    )
    assert subspace_overlap(pairs, other) == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="not orthonormal"):
        subspace_overlap(pairs, 2.0 * pairs.vectors)
    with pytest.raises(ValueError, match="different spaces"):
        subspace_overlap(pairs, np.eye(5)[:, :3])
