"""Kept gradient graphs give the same products as rebuilding them, and never go stale."""

import torch
from cases import CASE_NAMES, dense_hessian_of, make_case, rel_err

from curvscope import HessianOperator


def test_kept_graphs_give_the_same_products():
    for name in CASE_NAMES:
        case = make_case(name)
        op = HessianOperator(case.model, case.loss_fn, case.batches, keep_graphs=True)
        H = dense_hessian_of(name)
        V = torch.randn(
            op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
        )
        for _ in range(3):  # first pass builds the graphs, later passes reuse them
            assert rel_err(op.matmat(V), H @ V) <= 1e-10, name
            assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10, name
        assert len(op._graphs) == len(case.batches)
        op.release_graphs()
        assert not op._graphs
        assert rel_err(op.matmat(V), H @ V) <= 1e-10, name
