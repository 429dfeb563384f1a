"""SciPy interop, both ways: ``op.to_scipy()`` against dense products and against curvscope's own
numerics, and the numerics on SciPy operators and sparse matrices against dense answers.

Tolerances: a SciPy view multiplies in the operator's own arithmetic, so its products equal the
operator's bit for bit (checked with ``==``); a SciPy operator built from a dense matrix
multiplies with numpy instead of torch, so results agree with the dense ones to rounding
(1e-12 relative); eigsh and top_eigenpairs both drive pairs to residual 1e-8 and agree to
that.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from cases import dense_hessian_of, make_case, planted
from scipy.sparse.linalg import LinearOperator, aslinearoperator, eigs, eigsh

from curvscope import (
    DenseOperator,
    HessianOperator,
    from_scipy,
    lanczos,
    spectral_density,
    to_scipy,
    top_eigenpairs,
    trace,
)
from curvscope.linalg import ScipyAsTorch, TorchAsScipy, as_operator, diagonal
from curvscope.linalg.nonnormal import eigenvector_condition, power_norms, spectral_radius
from curvscope.operators.lowrank import LowRankOperator
from curvscope.operators.update import OptimizerConfig, UpdateOperator

NAME = "tanh_mlp_ce"


@pytest.fixture(scope="module")
def hessian():
    case = make_case(NAME)
    return HessianOperator(case.model, case.loss_fn, case.batches), dense_hessian_of(NAME)


def test_to_scipy_is_a_linear_operator_with_the_operators_products(hessian):
    H, dense = hessian
    A = H.to_scipy()
    n = H.shape[0]
    assert isinstance(A, LinearOperator) and isinstance(A, TorchAsScipy)
    assert A.shape == (n, n) and A.dtype == np.float64 and A.operator is H
    assert aslinearoperator(A) is A
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(n), rng.standard_normal((n, 3))
    exact = H.matmat(torch.from_numpy(X)).numpy()
    for got in (A.matmat(X), A @ X, A.dot(X)):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (n, 3)
        assert np.array_equal(got, exact)
    y = A.matvec(x)
    assert y.shape == (n,) and np.array_equal(y, H.matvec(torch.from_numpy(x)).numpy())
    assert A.matvec(x[:, None]).shape == (n, 1)  # SciPy keeps a column a column
    assert np.allclose(y, dense.numpy() @ x, rtol=0, atol=1e-12 * np.abs(dense).max())
    # symmetric: the transpose and adjoint are the operator itself
    assert np.array_equal(A.rmatvec(x), y) and np.array_equal(A.rmatmat(X), exact)
    assert A.T is A and A.H is A
    # real operator, complex block: A Re + i A Im
    Z = X + 1j * rng.standard_normal((n, 3))
    assert np.allclose(A @ Z, exact + 1j * (A @ Z.imag), rtol=0, atol=1e-14)
    # float32 and integer inputs are converted; the result stays in the operator's dtype
    assert (A @ x.astype(np.float32)).dtype == np.float64
    assert np.array_equal(A @ np.ones(n, dtype=np.int64), A @ np.ones(n))


def test_eigsh_on_the_scipy_view_matches_top_eigenpairs(hessian):
    H, _ = hessian
    ours = top_eigenpairs(H, k=3, tol=1e-8)
    values = eigsh(H.to_scipy(), k=3, which="LA", tol=1e-10, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values)[::-1], ours.values, rtol=1e-8)


def test_float32_operator_gives_float32_arrays():
    case = make_case(NAME)
    H = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float32)
    A = H.to_scipy()
    x = np.random.default_rng(1).standard_normal(H.shape[0])
    y = A @ x  # float64 in, cast to the operator's float32
    assert A.dtype == np.float32 and y.dtype == np.float32
    assert np.array_equal(y, H.matvec(torch.from_numpy(x).float()).numpy())


def test_low_rank_operator_and_the_generic_function():
    rng = np.random.default_rng(2)
    columns = torch.from_numpy(rng.standard_normal((7, 2)))
    op = LowRankOperator(columns, torch.tensor([2.0, 0.5], dtype=torch.float64))
    A = to_scipy(op)
    M = op.to_dense().numpy()
    x = rng.standard_normal(7)
    assert np.allclose(A @ x, M @ x, rtol=0, atol=1e-13)
    # an operator that is only duck-typed (shape, dtype, device, matmat) works too
    assert np.allclose(to_scipy(DenseOperator(M)) @ x, M @ x, rtol=0, atol=1e-13)


def test_dense_operator_transpose_is_exact_for_any_matrix():
    M = np.random.default_rng(3).standard_normal((5, 5))  # not symmetric
    A = DenseOperator(M).to_scipy()
    x = np.arange(5.0)
    assert np.allclose(A.rmatvec(x), M.T @ x, rtol=0, atol=1e-13)
    assert np.allclose(A.T @ x, M.T @ x, rtol=0, atol=1e-13)
    assert np.allclose(A.H @ x, M.T @ x, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "config",
    [
        OptimizerConfig("gd", lr=0.1, weight_decay=0.01),
        OptimizerConfig("heavy_ball", lr=0.1, momentum=0.9, dampening=0.1),
        OptimizerConfig("nesterov", lr=0.1, momentum=0.9, weight_decay=0.1),
        OptimizerConfig(
            "adam", lr=0.1, momentum=0.9, beta2=0.99, eps=1e-8, v_hat=np.linspace(0.1, 2, 6)
        ),
    ],
    ids=lambda c: c.method,
)
def test_update_operator_is_not_symmetric_and_gets_its_true_transpose(config):
    """T with a diagonal preconditioner P is non-symmetric (P H != H P; Adam's P from v_hat, an
    explicit one for SGD), so rmatvec must be T^T, not T."""
    H = planted(np.linspace(-1.0, 3.0, 6), seed=4)
    P = None if config.method == "adam" else np.linspace(0.5, 1.5, 6)
    T = UpdateOperator(H, config, preconditioner=P)
    D = T.dense().numpy()
    assert not np.allclose(D, D.T)
    A = T.to_scipy()
    rng = np.random.default_rng(5)
    x, X = rng.standard_normal(D.shape[0]), rng.standard_normal((D.shape[0], 3))
    assert np.allclose(A @ x, D @ x, rtol=0, atol=1e-13)
    assert np.allclose(A.rmatvec(x), D.T @ x, rtol=0, atol=1e-13)
    assert np.allclose(A.rmatmat(X), D.T @ X, rtol=0, atol=1e-13)
    assert np.allclose(A.T @ x, D.T @ x, rtol=0, atol=1e-13)
    assert A.T is not A
    # SciPy's non-symmetric eigensolver on the view gives T's eigenvalues
    k = 2
    ours = eigs(A, k=k, which="LM", return_eigenvectors=False)
    exact = np.linalg.eigvals(D)
    top = exact[np.argsort(-np.abs(exact))][:k]
    np.testing.assert_allclose(np.sort(np.abs(ours)), np.sort(np.abs(top)), rtol=1e-8)
    # the non-normal numerics take the operator or its SciPy view
    assert spectral_radius(A) == pytest.approx(spectral_radius(D), rel=1e-12)
    assert spectral_radius(T) == pytest.approx(spectral_radius(D), rel=1e-12)


def test_symmetric_false_without_a_transpose_refuses_rmatvec():
    class Plain:  # a duck-typed operator with no rmatmat
        shape, dtype, device = (3, 3), torch.float64, torch.device("cpu")

        def matmat(self, V):
            return 2 * V

    A = to_scipy(Plain(), symmetric=False)
    assert np.array_equal(A @ np.ones(3), 2 * np.ones(3))
    with pytest.raises(NotImplementedError, match="not symmetric and has no rmatmat"):
        A.rmatvec(np.ones(3))


def test_aslinearoperator_on_the_operator_itself_is_not_supported(hessian):
    """Documents SciPy's limit (docs/interop.md): it reads op.dtype through numpy.dtype. If a
    SciPy release ever accepts it, this test says so and the docs can name both routes."""
    H, _ = hessian
    with pytest.raises(TypeError, match=r"torch\.float64"):
        aslinearoperator(H)


# ----- the numerics on SciPy operators --------------------------------------------------------


def spiked() -> np.ndarray:
    return planted(np.r_[np.linspace(-1.0, 2.0, 45), [10.0, 20.0, 30.0]], seed=6).numpy()


def scipy_forms(M: np.ndarray) -> dict[str, object]:
    """The same matrix as a LinearOperator (from numpy, and as a bare callable), csr, csc."""
    return {
        "matrix_operator": aslinearoperator(M),
        "callable_operator": LinearOperator(M.shape, matvec=lambda x: M @ x, dtype=M.dtype),
        "csr_matrix": scipy.sparse.csr_matrix(M),
        "csr_array": scipy.sparse.csr_array(M),
    }


@pytest.mark.parametrize("form", list(scipy_forms(np.eye(2))))
def test_trace_density_eigenpairs_lanczos_diagonal_on_scipy_match_dense(form):
    M = spiked()
    A = scipy_forms(M)[form]
    op = as_operator(A)
    assert isinstance(op, ScipyAsTorch) and op.dtype == torch.float64 and op.shape == M.shape

    got, want = trace(A, num_probes=30, seed=0), trace(M, num_probes=30, seed=0)
    assert got.value == pytest.approx(want.value, rel=1e-12)
    assert got.std_error == pytest.approx(want.std_error, rel=1e-9)

    got, want = spectral_density(A, num_iters=20, num_probes=2), spectral_density(M, 20, 2)
    np.testing.assert_allclose(got.nodes, want.nodes, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.weights, want.weights, rtol=0, atol=1e-10)

    pairs = top_eigenpairs(A, k=3)
    np.testing.assert_allclose(pairs.values, [30.0, 20.0, 10.0], rtol=1e-8)

    steps = lanczos(A, num_iters=10, seed=1)
    alphas, _ = steps.tridiagonal(0)
    np.testing.assert_allclose(alphas, lanczos(M, num_iters=10, seed=1).tridiagonal(0)[0])

    d = diagonal(A, num_products=30, seed=0).values
    np.testing.assert_allclose(d, diagonal(M, num_products=30, seed=0).values, atol=1e-10)


def test_float32_scipy_operator_stays_float32_and_dtype_can_be_forced():
    M = spiked().astype(np.float32)
    assert as_operator(aslinearoperator(M)).dtype == torch.float32
    assert from_scipy(aslinearoperator(M), dtype=torch.float64).dtype == torch.float64
    # integer matrices are computed in float64
    assert as_operator(scipy.sparse.csr_matrix(np.eye(3, dtype=np.int64))).dtype == torch.float64


def test_round_trip_gives_back_the_operator(hessian):
    H, _ = hessian
    assert as_operator(H.to_scipy()) is H
    assert from_scipy(H.to_scipy()) is H
    # a non-symmetric SciPy operator keeps its transpose through curvscope and back
    M = np.random.default_rng(7).standard_normal((4, 4))
    back = to_scipy(from_scipy(aslinearoperator(M)))
    x = np.arange(4.0)
    assert np.allclose(back @ x, M @ x, rtol=0, atol=1e-14)
    assert np.allclose(back.rmatvec(x), M.T @ x, rtol=0, atol=1e-14)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"square operator .* got shape \(3, 4\)"):
        as_operator(aslinearoperator(np.ones((3, 4))))
    with pytest.raises(ValueError, match="complex"):
        as_operator(aslinearoperator(np.eye(3) * 1j))
    with pytest.raises(ValueError, match="bfloat16: build the operator in float64 or float32"):
        DenseOperator(torch.eye(3, dtype=torch.bfloat16)).to_scipy()
    with pytest.raises(TypeError, match="not an operator"):
        to_scipy(np.eye(3))
    op = as_operator(aslinearoperator(np.eye(3)))
    with pytest.raises(ValueError, match=r"torch block of shape \(n=3, k\), got \(4, 1\)"):
        op.matmat(torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="dimension mismatch"):  # SciPy's own check
        DenseOperator(np.eye(3)).to_scipy() @ np.ones(4)
    with pytest.raises(ValueError, match=r"dtype must be torch\.float64 or torch\.float32"):
        from_scipy(aslinearoperator(np.eye(3)), dtype=torch.int64)


def test_nonnormal_numerics_on_scipy_operators_match_dense():
    T = np.array([[0.5, 4.0], [0.0, 0.4]])
    for form in (aslinearoperator(T), scipy.sparse.csr_matrix(T), DenseOperator(T)):
        np.testing.assert_allclose(power_norms(form, 20), power_norms(T, 20), rtol=1e-12)
        assert eigenvector_condition(form) == pytest.approx(eigenvector_condition(T), rel=1e-12)
    with pytest.raises(ValueError, match=r"square operator, got shape \(2, 3\)"):
        spectral_radius(aslinearoperator(np.ones((2, 3))))
