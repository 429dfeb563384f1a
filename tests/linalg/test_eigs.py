"""Extreme eigenpairs against dense eigvalsh, for the small nets' Hessians and planted matrices.

Tolerances: pairs are driven to a relative residual tol = 1e-8, and for a symmetric matrix
|theta - lambda| <= ||r|| (Weyl / Bauer-Fike), so eigenvalues are within 1e-8 ||H||; measured
errors were ~1e-15 ||H|| because a simple eigenvalue converges as the residual squared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASE_NAMES, dense_eigh_of, dense_hessian_of, make_case, planted

from curvscope import Eigenpairs, HessianOperator, top_eigenpairs

TOL = 1e-8


def extreme(values: np.ndarray, vectors: np.ndarray, which: str, k: int):
    """The k dense pairs top_eigenpairs should return, most extreme first."""
    order = {"largest": np.argsort(-values), "smallest": np.argsort(values)}.get(
        which, np.argsort(-np.abs(values))
    )[:k]
    return values[order], vectors[:, order]


def simple(values: np.ndarray, index: int, gap: float) -> bool:
    """True when eigenvalue ``index`` is at least ``gap`` away from every other one."""
    others = np.delete(values, index)
    return bool(np.min(np.abs(others - values[index])) >= gap)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_hessian_eigenpairs_match_dense(name, which):
    case = make_case(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    values, vectors = dense_eigh_of(name)
    norm = np.abs(values).max()
    result = top_eigenpairs(op, k=3, which=which, tol=TOL)
    expected_values, expected_vectors = extreme(values, vectors, which, 3)

    assert result.values.shape == (3,) and result.vectors.shape == (op.num_params, 3)
    np.testing.assert_allclose(result.values, expected_values, rtol=0, atol=TOL * norm)
    assert np.all(result.residuals <= TOL) and np.all(result.converged)
    # The residuals are what they claim, checked against the dense matrix.
    H = dense_hessian_of(name).numpy()
    true_residuals = np.linalg.norm(H @ result.vectors - result.vectors * result.values, axis=0)
    assert np.all(true_residuals <= TOL * norm)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=0), 1.0, atol=1e-12)
    # Eigenvectors: a simple eigenvalue (gap >= 1e-3 ||H||) fixes its vector up to sign; the
    # angle is <= residual / gap ~ 1e-5, so |cos| >= 1 - 1e-9 is far inside what it allows.
    cosines = np.abs(np.sum(result.vectors * expected_vectors, axis=0))
    checked = 0
    for i, value in enumerate(expected_values):
        if simple(values, int(np.argmin(np.abs(values - value))), 1e-3 * norm):
            assert cosines[i] >= 1 - 1e-9
            checked += 1
    assert checked >= 1  # the small nets' extreme eigenvalues are simple


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_pair_by_early_stopped_lanczos_matches_dense(name, which):
    """k = 1 goes through plain Lanczos with an early stop: the pair meets tol against the
    dense Hessian, and it needs fewer products than ARPACK's restarted search."""
    case = make_case(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    values, vectors = dense_eigh_of(name)
    norm = np.abs(values).max()
    expected_value, expected_vector = extreme(values, vectors, which, 1)
    result = top_eigenpairs(op, k=1, which=which, tol=TOL)
    assert result.meta["method"] == "lanczos"
    assert abs(result.values[0] - expected_value[0]) <= TOL * norm
    H = dense_hessian_of(name).numpy()
    u = result.vectors[:, 0]
    assert np.linalg.norm(H @ u - result.values[0] * u) <= TOL * norm
    assert result.converged[0] and result.residuals[0] <= TOL
    if simple(values, int(np.argmin(np.abs(values - expected_value[0]))), 1e-3 * norm):
        assert abs(u @ expected_vector[:, 0]) >= 1 - 1e-9
    arpack = top_eigenpairs(op, k=1, which=which, tol=TOL, method="arpack")
    assert abs(arpack.values[0] - result.values[0]) <= TOL * norm
    assert result.meta["num_products"] <= arpack.meta["num_products"]


def test_lanczos_stops_early_at_a_loose_tolerance_and_falls_back_when_capped():
    """A loose tolerance takes few steps; a basis cap too small for the tolerance hands the
    Ritz vector on to ARPACK, which finishes the job (and the products of both are counted)."""
    values = np.r_[np.linspace(0.0, 1.0, 397), [1.02, 1.04, 1.06]]  # gap 2% at the top
    A = planted(values, seed=7)
    loose = top_eigenpairs(A, k=1, tol=1e-2)
    tight = top_eigenpairs(A, k=1, tol=1e-10)
    assert loose.meta["method"] == tight.meta["method"] == "lanczos"
    assert loose.meta["num_products"] < tight.meta["num_products"]
    assert abs(tight.values[0] - 1.06) <= 1e-10 and tight.converged[0]
    # 4 steps (the floor of the cap, 2k + 2) cannot reach 1e-10 with a 2% gap: ARPACK goes on.
    capped = top_eigenpairs(A, k=1, tol=1e-10, max_basis_bytes=0)
    assert capped.meta["method"] == "lanczos+arpack"
    assert abs(capped.values[0] - 1.06) <= 1e-10 and capped.converged[0]
    assert capped.meta["num_products"] > 5  # 4 Lanczos steps, their check, then ARPACK


def test_smallest_of_a_singular_psd_matrix_is_converged():
    """The 'smallest' pairs of a rank-deficient positive semi-definite matrix (a GGN, say)
    are eigenvalue 0: their residual must be measured against ||A||, not against |0|."""
    values = np.r_[np.zeros(10), np.linspace(1.0, 5.0, 30)]
    A = planted(values, seed=1)
    result = top_eigenpairs(A, k=3, which="smallest", tol=TOL)
    np.testing.assert_allclose(result.values, 0.0, atol=TOL * 5.0)
    assert np.all(result.converged), result.residuals
    # The vectors lie in the null space.
    assert np.linalg.norm(A.numpy() @ result.vectors) <= 1e-10
    # And the norm estimate never loosens the test of a pair that is wrong.
    wrong = top_eigenpairs(A, k=3, which="smallest", tol=1e-30)
    assert not np.all(wrong.converged)


def test_magnitude_and_repeated_eigenvalues():
    """A negative eigenvalue of largest magnitude, and a repeated top eigenvalue whose pair
    of vectors must span its eigenspace (individual vectors are not unique)."""
    values = np.r_[[-7.0, 4.0, 4.0], np.linspace(-1.0, 2.0, 37)]
    A = planted(values, seed=2)
    U = np.linalg.eigh(A.numpy())[1]
    result = top_eigenpairs(A, k=3, which="magnitude", tol=TOL)
    np.testing.assert_allclose(result.values, [-7.0, 4.0, 4.0], atol=1e-10)
    assert np.all(result.converged)
    space = U[:, [-2, -1]]  # eigenvectors of 4.0, 4.0
    projection = space.T @ result.vectors[:, 1:]
    np.testing.assert_allclose(np.linalg.svd(projection, compute_uv=False), 1.0, atol=1e-9)
    assert abs(U[:, 0] @ result.vectors[:, 0]) >= 1 - 1e-12

    largest = top_eigenpairs(A, k=2, which="largest", tol=TOL)
    np.testing.assert_allclose(largest.values, [4.0, 4.0], atol=1e-10)
    smallest = top_eigenpairs(A, k=1, which="smallest", tol=TOL)
    np.testing.assert_allclose(smallest.values, [-7.0], atol=1e-10)


def test_same_seed_same_result_and_products_counted():
    A = planted(np.linspace(-1.0, 3.0, 50), seed=3)
    first = top_eigenpairs(A, k=2, seed=4)
    again = top_eigenpairs(A, k=2, seed=4)
    assert np.array_equal(first.values, again.values)
    assert np.array_equal(first.vectors, again.vectors)
    assert first.meta["seed"] == 4 and first.meta["which"] == "largest"
    assert first.meta["num_products"] >= 2  # at least the final check of both pairs


def test_float32_operator_is_accepted():
    """The products run in float32, the search in float64: eigenvalues to float32 accuracy."""
    case = make_case("tanh_mlp_ce")
    op = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float32)
    values, _ = dense_eigh_of("tanh_mlp_ce")
    result = top_eigenpairs(op, k=1, tol=1e-5)
    assert result.values[0] == pytest.approx(values.max(), rel=1e-5)
    assert result.meta["operator_dtype"] == "float32"


@pytest.mark.parametrize("with_vectors", [True, False])
def test_save_load_round_trip(tmp_path, with_vectors):
    result = top_eigenpairs(planted(np.linspace(0.0, 1.0, 20), seed=5), k=2)
    result.save(tmp_path / "eigs", with_vectors=with_vectors)
    loaded = Eigenpairs.load(tmp_path / "eigs")
    assert np.array_equal(loaded.values, result.values)
    assert np.array_equal(loaded.residuals, result.residuals)
    assert np.array_equal(loaded.converged, result.converged)
    assert loaded.meta == result.meta
    if with_vectors:
        assert np.array_equal(loaded.vectors, result.vectors)
    else:
        assert loaded.vectors.size == 0


def test_bad_arguments():
    A = planted(np.arange(5.0), seed=0)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k < n = 5, got 5"):
        top_eigenpairs(A, k=5)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k < n = 5, got 0"):
        top_eigenpairs(A, k=0)
    with pytest.raises(ValueError, match="which must be one of"):
        top_eigenpairs(A, which="LA")
    with pytest.raises(ValueError, match="method must be 'auto', 'lanczos' or 'arpack'"):
        top_eigenpairs(A, method="power")
