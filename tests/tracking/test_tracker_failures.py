"""The tracker's failure policy: a measurement that cannot be taken yet is skipped with its
reason, one that fails after it once worked is recorded as failed (training goes on), and a
mistake raises at the first snapshot; a run folder without a committed snapshot does not block
a new run; the dropout refusal names the Tracker's eval_mode."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from cases import make_case
from torch import nn

from curvscope.tracking import (
    MEASUREMENTS,
    MeasurementSkipped,
    Tracker,
    load_run,
    register_measurement,
)
from curvscope.tracking.tracker import format_line

FAST = {"density_iters": 8, "density_probes": 2, "trace_probes": 12}


def full_loss(case, model):
    return sum(case.loss_fn(model(x), y) * len(y) for x, y in case.batches) / 21


def test_adam_stability_is_skipped_before_the_first_step_then_measured(tmp_path, caplog):
    """Before Adam's first step it has no second moments: the snapshot is written without the
    stability scalars, a warning says why, and the reason is stored with the snapshot."""
    case = make_case("tanh_mlp_ce")
    model = case.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with caplog.at_level(logging.INFO, logger="curvscope.tracking"):
        tracker = Tracker(
            tmp_path / "run",
            case.loss_fn,
            case.batches,
            schedule="steps:0,1",
            measurements=("top", "stability"),
            **FAST,
        )
        snapshots = []
        for step in range(2):
            loss = full_loss(case, model)
            snapshots.append(tracker.step(step, model, optimizer, loss=loss))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        tracker.close()
    first, second = snapshots
    assert "lambda_max" in first.scalars and "sharpness" not in first.scalars
    assert first.notes["stability"]["status"] == "skipped"
    assert "AdamW has no second-moment state" in first.notes["stability"]["reason"]
    assert second.notes == {} and second.scalars["sharpness"] > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "step 0: measurement 'stability' skipped: AdamW has no second-moment" in (
        warnings[0].getMessage()
    )
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines[0].endswith("[skipped: stability]") and "skipped" not in lines[1]
    run = load_run(tmp_path / "run")
    assert run.problems == []
    assert run.notes == {0: first.notes}
    assert math.isnan(run.scalars["sharpness"][0]) and run.scalars["sharpness"][1] > 0


def test_a_failure_after_a_success_is_recorded_and_training_goes_on(tmp_path, caplog):
    calls = []

    @register_measurement("flaky_test")
    def flaky(op, model, optimizer, tracker):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("no convergence this time")
        return {"flaky": float(len(calls))}, {}

    @register_measurement("after_test")
    def after(op, model, optimizer, tracker):
        values, _ = tracker.current["flaky_test"]  # a measurement that needs flaky_test
        return {"after": values["flaky"] + 10}, {}

    try:
        case = make_case("tanh_mlp_ce")
        with (
            caplog.at_level(logging.INFO, logger="curvscope.tracking"),
            Tracker(
                tmp_path / "run",
                case.loss_fn,
                case.batches,
                schedule="every:1",
                measurements=("flaky_test", "top", "after_test"),
                progress=False,
                **FAST,
            ) as tracker,
        ):
            snapshots = [tracker.step(s, case.model, loss=0.5) for s in range(3)]
        assert [s.notes for s in snapshots[::2]] == [{}, {}]
        failed = snapshots[1]
        assert failed.notes["flaky_test"] == {
            "status": "failed",
            "reason": "RuntimeError: no convergence this time",
        }
        # "after_test" needs it: its note says so (dependent measurements are skipped).
        assert failed.notes["after_test"]["status"] == "skipped"
        assert "'flaky_test', which was failed" in failed.notes["after_test"]["reason"]
        assert "flaky" not in failed.scalars and "after" not in failed.scalars
        assert failed.scalars["lambda_max"] > 0 and failed.scalars["loss"] == 0.5
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        assert errors[0].getMessage() == (
            "step 1: measurement 'flaky_test' failed (recorded; training goes on): "
            "RuntimeError: no convergence this time"
        )
        run = load_run(tmp_path / "run")
        assert run.steps.tolist() == [0, 1, 2] and set(run.notes) == {1}
        np.testing.assert_array_equal(run.scalars["flaky"], [1.0, np.nan, 3.0])
        assert "[skipped: after_test]  [failed: flaky_test]" in format_line(
            1, failed.scalars, failed.notes
        )
    finally:
        MEASUREMENTS.pop("flaky_test")
        MEASUREMENTS.pop("after_test")


def test_mistakes_raise_at_the_first_snapshot(tmp_path):
    """Until a measurement (or the operator) has worked once, its errors propagate."""
    case = make_case("tanh_mlp_ce")

    def bad_loss(outputs, targets):  # per-sample losses, not the mean
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    tracker = Tracker(tmp_path / "a", bad_loss, case.batches, "every:1", progress=False)
    with pytest.raises(ValueError, match="mean loss as a scalar") as raised:
        tracker.step(0, case.model)
    assert any("before it had once succeeded" in note for note in raised.value.__notes__)
    assert tracker.completed_steps == set()
    tracker.close()

    @register_measurement("broken_test")
    def broken(op, model, optimizer, tracker):
        return {"x": optimizer.param_groups}, {}  # a bug: optimizer is None here

    try:
        with (
            Tracker(
                tmp_path / "b",
                case.loss_fn,
                case.batches,
                "every:1",
                measurements=("top", "broken_test"),
                progress=False,
            ) as tracker,
            pytest.raises(AttributeError, match="param_groups"),
        ):
            tracker.step(0, case.model)
    finally:
        MEASUREMENTS.pop("broken_test")


def test_operator_failure_after_the_first_snapshot_is_recorded(tmp_path, caplog):
    """A model that turns random later (dropout switched on) cannot be measured: the snapshot
    keeps the user's scalars and notes every measurement as failed, with the Tracker's advice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(p=0.0), nn.Linear(6, 3))
    case = make_case("tanh_mlp_ce")
    with Tracker(
        tmp_path / "run",
        case.loss_fn,
        case.batches,
        "every:1",
        measurements=("top", "trace"),
        progress=False,
        **FAST,
    ) as tracker:
        assert tracker.step(0, model).notes == {}
        model[2].p = 0.5
        with caplog.at_level(logging.ERROR, logger="curvscope.tracking"):
            snapshot = tracker.step(1, model, loss=0.25)
    assert set(snapshot.notes) == {"top", "trace"}
    reason = snapshot.notes["top"]["reason"]
    assert reason.startswith("the Hessian operator could not be built: ValueError: modules ['2']")
    assert "Tracker(..., eval_mode=True)" in reason
    assert snapshot.scalars["loss"] == 0.25 and "lambda_max" not in snapshot.scalars
    assert len(caplog.records) == 1
    assert load_run(tmp_path / "run").steps.tolist() == [0, 1]


def test_dropout_refusal_names_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(p=0.3), nn.Linear(6, 3))
    case = make_case("tanh_mlp_ce")
    advice = r"Tracker\(\.\.\., eval_mode=True\)"
    with (
        Tracker(tmp_path / "run", case.loss_fn, case.batches, "every:1") as tracker,
        pytest.raises(ValueError, match=advice) as raised,
    ):
        tracker.step(0, model)
    message = str(raised.value)
    assert "random in train mode" in message and "call model.eval()" not in message


def test_an_empty_run_folder_does_not_block_a_new_run(tmp_path):
    """A run that crashed before its first snapshot left run.json and nothing else of value:
    a new run (even with other settings) starts there; a run with snapshots is still refused."""
    case = make_case("tanh_mlp_ce")
    run_dir = tmp_path / "run"

    def bad_loss(outputs, targets):
        raise RuntimeError("bug in the loss")

    crashed = Tracker(run_dir, bad_loss, case.batches, "every:1", progress=False)
    with pytest.raises(RuntimeError, match="bug in the loss"):
        crashed.step(0, case.model)
    crashed.close()  # what the end of the crashed process does
    assert (run_dir / "run.json").exists()

    with Tracker(
        run_dir, case.loss_fn, case.batches, "every:1", measurements=("top",), progress=False
    ) as tracker:
        assert any("never committed a snapshot" in p.reason for p in tracker.store.problems)
        tracker.step(0, case.model)
    run = load_run(run_dir)
    assert run.steps.tolist() == [0] and run.config["measurements"] == ["top"]
    with pytest.raises(FileExistsError, match="resume=True"):
        Tracker(run_dir, case.loss_fn, case.batches, "every:1", measurements=("top",))


def test_skipped_is_exported():
    assert issubclass(MeasurementSkipped, Exception)
