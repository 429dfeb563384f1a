"""Lanczos with full reorthogonalization on dense symmetric matrices with known spectra.

Tolerances: with full reorthogonalization (a second pass when the DGKS test asks for it) the
basis is orthonormal to a small multiple of
machine epsilon (~1e-15 here), so 1e-12 flags any loss of orthogonality long before it shows
as spurious copies of eigenvalues; Q A Q^T reproduces T to ~1e-15 ||A||.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import planted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvscope.linalg import DenseOperator, lanczos, spectral_density
from curvscope.linalg.interface import gaussian_rows

N = 60


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    """An indefinite 60 x 60 matrix with a spread spectrum and two outliers."""
    values = np.r_[np.linspace(-1.0, 2.0, N - 2), [6.0, 9.0]]
    return planted(values, seed=11)


def tridiagonal_matrix(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


@pytest.mark.parametrize("steps", [25, 58])  # 58 of 60: every Ritz value has converged
@pytest.mark.parametrize("basis", ["memory", "disk"])
def test_basis_is_orthonormal_and_spans_the_tridiagonal(matrix, basis, steps, tmp_path):
    probes = 3
    result = lanczos(
        matrix, steps, num_probes=probes, seed=4, basis=basis, basis_dir=tmp_path, keep_basis=True
    )
    A = matrix.numpy()
    norm = np.linalg.norm(A, 2)
    starts = gaussian_rows(probes, N, 4, torch.device("cpu")).numpy()
    np.testing.assert_allclose(result.start_norms, np.linalg.norm(starts, axis=1), rtol=1e-14)
    assert list(result.num_steps) == [steps] * probes
    for p in range(probes):
        Q = result.basis.vectors(p, steps).cpu().numpy()  # rows q_1 .. q_m
        assert Q.shape == (steps, N)
        np.testing.assert_allclose(Q[0], starts[p] / np.linalg.norm(starts[p]), atol=1e-15)
        assert np.abs(Q @ Q.T - np.eye(steps)).max() <= 1e-12
        alphas, betas = result.tridiagonal(p)
        T = tridiagonal_matrix(alphas, betas)
        assert np.abs(Q @ A @ Q.T - T).max() <= 1e-12 * norm
        # A Q^T = Q^T T + beta_m q_{m+1} e_m^T: only the last column has a residual, of norm
        # betas[p, m - 1], the documented last-residual entry.
        residual = A @ Q.T - Q.T @ T
        assert np.abs(residual[:, :-1]).max() <= 1e-12 * norm
        assert np.linalg.norm(residual[:, -1]) == pytest.approx(
            result.betas[p, steps - 1], rel=1e-10
        )
    result.basis.close()


def test_disk_basis_file_is_removed_unless_kept(matrix, tmp_path):
    lanczos(matrix, 10, num_probes=2, basis="disk", basis_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    kept = lanczos(matrix, 10, num_probes=2, basis="disk", basis_dir=tmp_path, keep_basis=True)
    assert len(list(tmp_path.iterdir())) == 1
    kept.basis.close()  # kept: the caller owns the file
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("basis", ["memory", "disk"])
def test_disk_basis_gives_the_same_nodes_as_memory(matrix, basis, tmp_path):
    """The disk basis reorthogonalizes in chunks of steps (another summation order), so the
    nodes agree to rounding, ~1e-15 ||A||; 1e-10 is the stated bound."""
    memory = spectral_density(matrix, num_iters=30, num_probes=4, seed=2)
    other = spectral_density(
        matrix, num_iters=30, num_probes=4, seed=2, basis=basis, basis_dir=tmp_path
    )
    np.testing.assert_allclose(other.nodes, memory.nodes, rtol=0, atol=1e-10)
    np.testing.assert_allclose(other.weights, memory.weights, rtol=0, atol=1e-10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("basis", ["memory", "disk"])
def test_breakdown_with_five_distinct_eigenvalues(basis, tmp_path):
    distinct = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])
    A = planted(np.repeat(distinct, 8), seed=2)  # n = 40, Krylov spaces have dimension 5
    result = lanczos(A, 20, num_probes=3, basis=basis, basis_dir=tmp_path, keep_basis=True)
    assert list(result.num_steps) == [5, 5, 5]
    assert np.isfinite(result.alphas).all() and np.isfinite(result.betas).all()
    assert np.all(result.alphas[:, 5:] == 0) and np.all(result.betas[:, 5:] == 0)
    for p in range(3):
        ritz = np.linalg.eigvalsh(tridiagonal_matrix(*result.tridiagonal(p)))
        np.testing.assert_allclose(ritz, distinct, atol=1e-10)
        assert result.betas[p, 4] <= 1e-10  # the invariant subspace was reached
        Q = result.basis.vectors(p, 5).cpu().numpy()
        assert np.abs(Q @ Q.T - np.eye(5)).max() <= 1e-12
    result.basis.close()

    density = spectral_density(A, num_iters=20, num_probes=3, basis=basis, basis_dir=tmp_path)
    assert list(density.num_steps) == [5, 5, 5]
    assert np.isnan(density.nodes[:, 5:]).all() and np.all(density.weights[:, 5:] == 0)
    nodes, weights = density.flat()
    assert nodes.size == 15 and np.isfinite(weights).all()
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, atol=1e-12)
    _, smooth = density.density()
    assert np.isfinite(smooth).all()


def test_probes_in_lockstep_break_down_at_their_own_step():
    """One start vector inside a 2-eigenvalue invariant subspace, one generic: the first stops
    after 2 steps, the second runs on, and the early stop does not disturb it."""
    distinct = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 4.0])
    values = np.repeat(distinct, 5)
    A = planted(values, seed=3)
    U = torch.from_numpy(np.linalg.eigh(A.numpy())[1])  # ascending: first 10 are -2 and -1
    rng = np.random.default_rng(0)
    inside = U[:, :10] @ torch.from_numpy(rng.standard_normal(10))
    generic = torch.from_numpy(rng.standard_normal(30))
    together = lanczos(A, 10, start=torch.stack([inside, generic], dim=1))
    alone = lanczos(A, 10, start=generic)
    assert list(together.num_steps) == [2, 6]
    np.testing.assert_allclose(
        np.linalg.eigvalsh(tridiagonal_matrix(*together.tridiagonal(0))), [-2.0, -1.0], atol=1e-10
    )
    np.testing.assert_allclose(together.alphas[1], alone.alphas[0], atol=1e-13)
    np.testing.assert_allclose(together.betas[1], alone.betas[0], atol=1e-13)


def test_dense_tensor_numpy_array_and_operator_agree(matrix):
    by_tensor = lanczos(matrix, 12, num_probes=2, seed=5)
    by_array = lanczos(matrix.numpy(), 12, num_probes=2, seed=5)
    by_operator = lanczos(DenseOperator(matrix), 12, num_probes=2, seed=5)
    for other in (by_array, by_operator):
        assert np.array_equal(other.alphas, by_tensor.alphas)
        assert np.array_equal(other.betas, by_tensor.betas)


def test_num_iters_is_capped_at_n():
    A = planted(np.arange(1.0, 9.0), seed=0)
    result = lanczos(A, 50)
    assert result.alphas.shape == (1, 8) and result.num_steps[0] == 8
    np.testing.assert_allclose(
        np.linalg.eigvalsh(tridiagonal_matrix(*result.tridiagonal(0))),
        np.arange(1.0, 9.0),
        atol=1e-12,
    )


def test_bad_arguments(matrix):
    with pytest.raises(ValueError, match="num_iters must be at least 1"):
        lanczos(matrix, 0)
    with pytest.raises(ValueError, match="num_probes must be at least 1"):
        lanczos(matrix, 5, num_probes=0)
    with pytest.raises(ValueError, match="a start vector is zero"):
        lanczos(matrix, 5, start=torch.zeros(N, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"start vectors must have shape \(n=60, k\)"):
        lanczos(matrix, 5, start=torch.ones(N + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="basis must be 'memory' or 'disk'"):
        lanczos(matrix, 5, basis="ram")
    with pytest.raises(ValueError, match="expected a square matrix"):
        lanczos(torch.ones(3, 4), 2)
    with pytest.raises(TypeError, match="needs shape, dtype, device and matmat"):
        lanczos(object(), 2)


# ----- property test: planted spectra with repeats and rank deficiency ---------------------------


@st.composite
def planted_spectra(draw):
    """Eigenvalues on a grid of spacing 0.5 in [-10, 10] (so "distinct" means >= 0.5 apart,
    far above the breakdown tolerance), with repeats and a block of zeros."""
    n = draw(st.integers(1, 30))
    levels = draw(st.lists(st.integers(-20, 20), min_size=1, max_size=6, unique=True))
    values = np.array(draw(st.lists(st.sampled_from(levels), min_size=n, max_size=n)), float)
    zeros = draw(st.integers(0, n))
    values[:zeros] = 0.0  # rank deficiency
    return 0.5 * values, draw(st.integers(0, 2**16))


@settings(
    max_examples=25,
    deadline=None,
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    spectrum=planted_spectra(),
    num_iters=st.integers(1, 35),
    num_probes=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_ritz_values_lie_in_the_spectrum_and_breakdown_is_clean(
    spectrum, num_iters, num_probes, seed
):
    values, matrix_seed = spectrum
    A = planted(values, seed=matrix_seed)
    result = lanczos(A, num_iters, num_probes=num_probes, seed=seed)
    assert np.isfinite(result.alphas).all() and np.isfinite(result.betas).all()
    distinct = np.unique(values).size
    assert np.all(result.num_steps >= 1)
    # The Krylov space of any start vector has dimension <= the number of distinct eigenvalues.
    assert np.all(result.num_steps <= min(num_iters, values.size, distinct))
    for p in range(num_probes):
        ritz = np.linalg.eigvalsh(tridiagonal_matrix(*result.tridiagonal(p)))
        assert ritz.min() >= values.min() - 1e-10
        assert ritz.max() <= values.max() + 1e-10

    density = spectral_density(A, num_iters=num_iters, num_probes=num_probes, seed=seed)
    nodes, weights = density.flat()
    assert np.isfinite(nodes).all() and np.isfinite(weights).all()
    assert nodes.min() >= values.min() - 1e-10 and nodes.max() <= values.max() + 1e-10
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, atol=1e-12)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_stop_callback_ends_the_run_early_with_the_same_recurrence(matrix):
    """stop(alphas, betas, num_steps) after each step: True ends the run there, and the steps
    taken equal the first steps of a full run."""
    seen = []

    def stop(alphas, betas, num_steps):
        seen.append(num_steps.copy())
        return int(num_steps.min()) >= 5

    early = lanczos(matrix, 20, num_probes=2, seed=3, stop=stop)
    full = lanczos(matrix, 20, num_probes=2, seed=3)
    assert list(early.num_steps) == [5, 5]
    assert [list(s) for s in seen] == [[j, j] for j in range(1, 6)]
    np.testing.assert_array_equal(early.alphas[:, :5], full.alphas[:, :5])
    np.testing.assert_array_equal(early.betas[:, :5], full.betas[:, :5])
    assert not early.alphas[:, 5:].any()
