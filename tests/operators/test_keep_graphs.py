"""Kept gradient graphs give the same products as rebuilding them, and never go stale."""

import pytest
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
        assert len(op.graph_cache.graphs) == len(case.batches)
        op.release_graphs()
        assert not op.graph_cache.graphs
        assert rel_err(op.matmat(V), H @ V) <= 1e-10, name


def test_auto_keeps_the_batches_that_fit_the_budget():
    """'auto' (the default) keeps graphs in data order while they fit ``graph_memory``;
    products are exact whether a batch is kept or rebuilt."""
    name = "tanh_mlp_ce"
    case = make_case(name)
    H = dense_hessian_of(name)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    everything = HessianOperator(case.model, case.loss_fn, case.batches)
    assert everything.keep_graphs == "auto"
    assert rel_err(everything.matmat(V), H @ V) <= 1e-10
    assert len(everything.graph_cache.graphs) == len(case.batches) >= 2
    sizes = everything.kept_graph_bytes
    assert sizes > 0

    nothing = HessianOperator(case.model, case.loss_fn, case.batches, graph_memory=0)
    for _ in range(2):
        assert rel_err(nothing.matmat(V), H @ V) <= 1e-10
    assert not nothing.graph_cache.graphs and nothing.kept_graph_bytes == 0

    # A budget for about one batch keeps some but not all, and the sum stays exact.
    per_batch = sizes // len(case.batches)
    some = HessianOperator(case.model, case.loss_fn, case.batches, graph_memory=per_batch + 64)
    for _ in range(2):
        assert rel_err(some.matmat(V), H @ V) <= 1e-10
    assert 1 <= len(some.graph_cache.graphs) < len(case.batches)
    assert some.kept_graph_bytes <= per_batch + 64

    off = HessianOperator(case.model, case.loss_fn, case.batches, keep_graphs=False)
    assert rel_err(off.matmat(V), H @ V) <= 1e-10 and not off.graph_cache.graphs


def test_auto_keeps_nothing_for_a_shuffling_loader():
    """A shuffling DataLoader puts other samples under a batch index on every pass: a mix of
    kept and rebuilt batches would count samples twice, so 'auto' keeps none."""
    from torch.utils.data import DataLoader, TensorDataset

    name = "tanh_mlp_ce"
    case = make_case(name)
    inputs = torch.cat([x for x, _ in case.batches])
    targets = torch.cat([t for _, t in case.batches])
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=7, shuffle=True)
    op = HessianOperator(case.model, case.loss_fn, loader)
    H = dense_hessian_of(name)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        assert rel_err(op.matmat(V), H @ V) <= 1e-10
    assert not op.graph_cache.graphs


def test_keep_graphs_arguments_are_checked():
    case = make_case("tanh_mlp_ce")
    with pytest.raises(ValueError, match="keep_graphs must be True, False or 'auto'"):
        HessianOperator(case.model, case.loss_fn, case.batches, keep_graphs="yes")
    with pytest.raises(ValueError, match="graph_memory must be >= 0"):
        HessianOperator(case.model, case.loss_fn, case.batches, graph_memory=-1)


def test_auto_falls_back_when_saved_tensor_hooks_are_refused(monkeypatch):
    """An operation that refuses saved-tensor hooks (simulated here) leaves 'auto' with
    nothing kept and exact products, instead of an error."""
    import contextlib

    @contextlib.contextmanager
    def refusing(pack, unpack):
        raise RuntimeError("saved tensor hooks are not supported here")
        yield

    name = "tanh_mlp_ce"
    case = make_case(name)
    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", refusing)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    H = dense_hessian_of(name)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        assert rel_err(op.matmat(V), H @ V) <= 1e-10
    assert not op.graph_cache.graphs and op.kept_graph_bytes == 0
