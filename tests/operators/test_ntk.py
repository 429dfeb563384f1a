"""NTK trace against the dense per-batch output Jacobian."""

import pytest
import torch
from cases import CASE_NAMES, make_case
from jacobians import batch_jacobians

from curvscope.operators.ntk import ntk_trace


@pytest.mark.parametrize("name", CASE_NAMES)
def test_exact_trace_matches_dense_jacobian(name):
    case = make_case(name)
    dense = sum(float((J * J).sum()) for _, J, _ in batch_jacobians(case.model, case.batches))
    result = ntk_trace(case.model, case.batches, chunk=7)  # chunks cut through samples
    assert result.value == pytest.approx(dense, rel=1e-12)
    assert result.num_samples == 21
    assert result.per_sample == pytest.approx(dense / 21, rel=1e-12)


def test_hutchinson_within_four_standard_errors():
    case = make_case("tanh_mlp_ce")
    exact = ntk_trace(case.model, case.batches).value
    estimate = ntk_trace(case.model, case.batches, method="hutchinson", num_probes=30, seed=3)
    assert estimate.std_error > 0
    assert abs(estimate.value - exact) <= 4 * estimate.std_error


def test_ntk_refuses_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    with pytest.raises(ValueError, match="random"):
        ntk_trace(model, [(torch.randn(4, 3), torch.zeros(4))])
