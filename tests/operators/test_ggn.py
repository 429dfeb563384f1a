"""GGNOperator and ResidualOperator against dense J^T H_L J and H - G."""

import pytest
import torch
from cases import CASE_NAMES, dense_hessian_of, make_case, rel_err
from jacobians import dense_ggn

from curvscope.operators import GGNOperator, ResidualOperator


@pytest.fixture(scope="module", params=CASE_NAMES)
def case_and_ggn(request):
    case = make_case(request.param)
    return case, dense_ggn(case.model, case.loss_fn, case.batches)


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_ggn_matches_dense(case_and_ggn, mode):
    case, G = case_and_ggn
    op = GGNOperator(case.model, case.loss_fn, case.batches, matmat_mode=mode)
    V = torch.randn(
        op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    assert rel_err(op.matmat(V), G @ V) <= 1e-10
    assert rel_err(op.matvec(V[:, 0]), G @ V[:, 0]) <= 1e-10


def test_ggn_is_positive_semidefinite_for_convex_losses(case_and_ggn):
    case, _ = case_and_ggn
    dense = GGNOperator(case.model, case.loss_fn, case.batches).to_dense()
    eigenvalues = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
    assert eigenvalues.min() >= -1e-12 * eigenvalues.abs().max()


def test_residual_is_hessian_minus_ggn(case_and_ggn):
    case, G = case_and_ggn
    H = dense_hessian_of(case.name)
    op = ResidualOperator(case.model, case.loss_fn, case.batches)
    V = torch.randn(
        op.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    # H - G can be much smaller than H: compare with the scale of H, the quantity subtracted.
    error = (op.matmat(V) - (H - G) @ V).norm() / (H @ V).norm()
    assert error <= 1e-10


def test_ggn_refuses_non_tensor_outputs():
    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.layer(x)}

    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    op = GGNOperator(
        DictNet(), lambda out, y: torch.nn.functional.cross_entropy(out["logits"], y), batches
    )
    with pytest.raises(TypeError, match="single tensor"):
        op.matvec(torch.zeros(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("operator", [GGNOperator, ResidualOperator])
def test_kept_graphs_give_bit_identical_products(case_and_ggn, operator):
    """G and H - G keep each batch's forward and output-space graph across products
    ("auto", the default): products equal the rebuilt ones bit for bit, pass after pass."""
    case, G = case_and_ggn
    kept = operator(case.model, case.loss_fn, case.batches)
    rebuilt = operator(case.model, case.loss_fn, case.batches, keep_graphs=False)
    V = torch.randn(
        kept.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    expected = rebuilt.matmat(V)
    for _ in range(3):
        assert torch.equal(kept.matmat(V), expected)
    assert len(kept.graph_cache.graphs) == len(case.batches) and kept.kept_graph_bytes > 0
    assert not rebuilt.graph_cache.graphs
    reference = G if operator is GGNOperator else dense_hessian_of(case.name) - G
    assert rel_err(expected, reference @ V) <= 1e-10
