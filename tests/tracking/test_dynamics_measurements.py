"""The tracker's stability and NTK measurements against direct computations (the
stochastic edge's: tests/analysis/test_stochastic_edge.py)."""

import numpy as np
import pytest
import torch
from cases import make_case

from curvscope.operators.ntk import ntk_trace
from curvscope.tracking import Tracker, load_run


def test_dynamics_measurements(tmp_path):
    case = make_case("tanh_mlp_ce")
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = Tracker(
        tmp_path / "run",
        case.loss_fn,
        case.batches,
        schedule="steps:0,2",
        measurements=("top", "density", "stability", "ntk"),
        density_iters=20,
        density_probes=2,
        progress=False,
        extra={"batch_size": 4, "ntk_probes": 20},
    )
    snapshots = []
    for step in range(3):
        loss = sum(case.loss_fn(model(x), y) * len(y) for x, y in case.batches) / 21
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshot = tracker.step(step, model, optimizer, loss=loss.item())
        if snapshot is not None:
            snapshots.append(snapshot)
    assert [s.step for s in snapshots] == [0, 2]
    last = snapshots[-1].scalars
    assert last["sharpness"] == last["lambda_max"]
    assert last["stability_threshold"] == pytest.approx(2 * 1.9 / 0.1, rel=1e-12)
    assert last["edge_ratio"] == pytest.approx(last["lambda_max"] / 38.0, rel=1e-12)
    exact = ntk_trace(model, case.batches).value
    assert abs(last["ntk_trace"] - exact) <= 4 * last["ntk_trace_std_error"]
    run = load_run(tmp_path / "run")
    assert np.allclose(run.scalars["stability_threshold"], 38.0)


def test_stability_needs_optimizer(tmp_path):
    case = make_case("tanh_mlp_ce")
    tracker = Tracker(
        tmp_path / "run",
        case.loss_fn,
        case.batches,
        schedule="steps:0",
        measurements=("stability",),
        progress=False,
    )
    with pytest.raises(ValueError, match="optimizer"):
        tracker.step(0, case.model)
