"""Loggers of the Tracker: TensorBoard event files read back with tensorboard's own reader, a
W&B offline run read back from its own file, both equal to the run folder; failures never cost
a snapshot; missing packages name the extra to install; ``curvscope track --tensorboard``."""

from __future__ import annotations

import ast
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from logreaders import isolate_wandb, read_events, wandb_history
from torch import nn

from curvscope.linalg import SpectralDensity
from curvscope.tracking import TensorBoardLogger, Tracker, WandbLogger, load_run
from curvscope.tracking.loggers import UNLOGGED_SCALARS, density_histogram

SOURCE = Path(__file__).resolve().parents[2] / "src" / "curvscope"
FAST = {"top_k": 2, "density_iters": 8, "density_probes": 2, "trace_probes": 12}
MEASUREMENTS = ("top", "trace", "density")


def problem():
    """A 4-6-3 tanh MLP (51 parameters) with MSE on two fixed batches, float64."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    Y = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, nn.functional.mse_loss, [(X[:12], Y[:12]), (X[12:], Y[12:])]


def train(tracker, steps=4, lr=0.2):
    """A plain full-batch GD loop (no trainer): the tracker sees the model before each update."""
    model, loss_fn, data = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with tracker:
        for step in range(steps + 1):
            optimizer.zero_grad()
            loss = sum(loss_fn(model(x), y) * len(x) for x, y in data) / 20
            tracker.step(step, model, optimizer, loss=loss)
            loss.backward()
            optimizer.step()


def tracker(run_dir, loggers, schedule="every:2", measurements=MEASUREMENTS):
    _, loss_fn, data = problem()
    return Tracker(
        run_dir, loss_fn, data, schedule, measurements, progress=False, loggers=loggers, **FAST
    )


def logged_names(run):
    return sorted(name for name in run.scalars if name not in UNLOGGED_SCALARS)


# --- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_events_equal_the_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    train(tracker(tmp_path / "run", [TensorBoardLogger(tmp_path / "tb", images=True)]))
    run = load_run(tmp_path / "run")
    assert run.problems == [] and run.steps.tolist() == [0, 2, 4]
    events = read_events(tmp_path / "tb")
    tags = events.Tags()
    # every scalar but the wall clock, under curvscope/, at the training steps
    assert sorted(tags["scalars"]) == [f"curvscope/{name}" for name in logged_names(run)]
    assert {"curvscope/lambda_max", "curvscope/trace", "curvscope/loss", "curvscope/lr"} <= set(
        tags["scalars"]
    )
    for name in logged_names(run):
        scalars = events.Scalars(f"curvscope/{name}")
        assert [event.step for event in scalars] == run.steps.tolist()
        # TensorBoard's scalar events hold float32: the stored value rounded once
        np.testing.assert_array_equal(
            [event.value for event in scalars], run.scalars[name].astype(np.float32), err_msg=name
        )
    # each snapshot's density as a histogram of its eigenvalues (counts sum to n) and a figure
    assert tags["histograms"] == ["curvscope/density"]
    histograms = events.Histograms("curvscope/density")
    assert [event.step for event in histograms] == run.steps.tolist()
    for event in histograms:
        value = event.histogram_value
        density = run.densities[event.step]
        nodes, weights = density.flat()
        assert value.num == density.n == 51
        assert math.isclose(sum(value.bucket), 51, rel_tol=1e-12)
        assert len(value.bucket) == len(value.bucket_limit) == 64
        assert value.min == run.scalars["density_lambda_min"][run.steps == event.step][0]
        assert value.max == value.bucket_limit[-1] == density.lambda_max
        # sum: n times the quadrature's first moment, an estimate of tr(H)
        assert math.isclose(value.sum, 51 * float(np.sum(weights * nodes)), rel_tol=1e-12)
        trace = run.scalars["trace"][run.steps == event.step][0]
        assert abs(value.sum - trace) < 0.5 * abs(trace)  # two estimates of one trace
    images = events.Images("curvscope/density_plot")
    assert [image.step for image in images] == run.steps.tolist()
    assert {(image.width, image.height) for image in images} == {(660, 240)}


def test_density_histogram_bins_the_quadrature_exactly():
    nodes = np.array([[0.0, 1.0, 4.0, np.nan], [2.0, 4.0, np.nan, np.nan]])
    weights = np.array([[0.5, 0.25, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0]])
    density = SpectralDensity(nodes, weights, np.array([3, 2]), n=8)
    histogram = density_histogram(density, bins=4)  # edges 0, 1, 2, 3, 4
    np.testing.assert_array_equal(histogram.edges, [0, 1, 2, 3, 4])
    # mass (1/2 per probe): 0 -> 0.25, 1 -> 0.125, 2 -> 0.25, 4 -> 0.125 + 0.25; times n = 8
    np.testing.assert_array_equal(histogram.counts, [2, 1, 2, 3])
    assert histogram.total == 8 * (0.125 + 0.5 + 1.5)  # 8 * sum(w x) = 17
    assert histogram.total_squares == 8 * (0.125 + 1 + 2 + 4)  # 57
    assert (histogram.minimum, histogram.maximum) == (0.0, 4.0)
    with pytest.raises(ValueError, match="bins must be >= 1"):
        density_histogram(density, bins=0)


# --- Weights & Biases ------------------------------------------------------------------------


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    isolate_wandb(monkeypatch, tmp_path)
    yield tmp_path
    wandb.teardown()


def test_wandb_offline_run_holds_the_run_folder_values(wandb_env):
    logger = WandbLogger(project="curvscope-test", dir=wandb_env)
    assert logger.run.settings.mode == "offline"
    train(tracker(wandb_env / "run", [logger]))
    run = load_run(wandb_env / "run")
    rows = wandb_history(wandb_env)
    assert [row["_step"] for row in rows] == [row["curvscope/step"] for row in rows] == [0, 2, 4]
    for row, step in zip(rows, run.steps, strict=True):
        at = run.steps == step
        for name in logged_names(run):
            assert row[f"curvscope/{name}"] == run.scalars[name][at][0], name  # float64 JSON
        assert "curvscope/unix_time" not in row
        # the density as a wandb.Histogram (nested keys _type, values, bins)
        assert row["curvscope/density/_type"] == "histogram"
        expected = density_histogram(run.densities[int(step)])
        np.testing.assert_allclose(row["curvscope/density/values"], expected.counts, rtol=1e-12)
        np.testing.assert_allclose(row["curvscope/density/bins"], expected.edges, rtol=1e-12)


def test_wandb_logs_into_an_existing_run_and_leaves_it_open(wandb_env):
    import wandb

    own = wandb.init(project="curvscope-test", mode="offline", dir=str(wandb_env))
    try:
        # the user's loop logs its own metric at every step; the snapshots join its rows
        logger = WandbLogger(run=own)
        model = problem()[0]
        with tracker(wandb_env / "run", [logger], measurements=("top",)) as track:
            for step in range(4):
                track.step(step, model)
                own.log({"train/metric": float(step)}, step=step)
        own.log({"after": 1.0}, step=4)  # still open after Tracker.close
    finally:
        own.finish()
    run = load_run(wandb_env / "run")
    rows = wandb_history(wandb_env)
    assert [row["_step"] for row in rows] == [0, 1, 2, 3, 4]  # the user's steps, unmoved
    assert [row["train/metric"] for row in rows[:4]] == [0.0, 1.0, 2.0, 3.0]
    snapshots = [row for row in rows if "curvscope/step" in row]
    assert [row["curvscope/step"] for row in snapshots] == [0, 2] == run.steps.tolist()
    assert [row["curvscope/lambda_max"] for row in snapshots] == run.scalars["lambda_max"].tolist()
    with pytest.raises(ValueError, match="logs into that run"):
        WandbLogger("other", run=own)


# --- failures, protocol, missing packages ---------------------------------------------------


class Recorder:
    def __init__(self, fail_at=()):
        self.calls, self.fail_at, self.closed = [], set(fail_at), 0

    def log_snapshot(self, step, scalars, results):
        self.calls.append((step, dict(scalars), sorted(results)))
        if step in self.fail_at:
            raise OSError(f"disk full at {step}")

    def close(self):
        self.closed += 1


def test_a_logger_failure_never_costs_the_snapshot(tmp_path, caplog):
    # A logger that fails at once raises out of step() after the snapshot is committed and
    # after the other loggers had it.
    first, other = Recorder(fail_at={0}), Recorder()
    model, _, _ = problem()
    track = tracker(tmp_path / "a", [first, other], measurements=("top",))
    with pytest.raises(OSError, match="disk full at 0") as raised:
        track.step(0, model, loss=1.5)
    assert "snapshot is committed" in "".join(raised.value.__notes__)
    assert load_run(tmp_path / "a").steps.tolist() == [0]
    assert [call[0] for call in other.calls] == [0]
    assert other.calls[0][1] == track.last.scalars and other.calls[0][2] == ["top"]
    track.close()
    track.close()
    assert (first.closed, other.closed) == (1, 1)
    # After one success a failure is a warning (the traceback once) and training goes on.
    flaky = Recorder(fail_at={2, 4})
    caplog.set_level(logging.WARNING, logger="curvscope.tracking")
    with tracker(tmp_path / "b", [flaky], measurements=("top",)) as track:
        for step in range(5):
            track.step(step, model)
    assert load_run(tmp_path / "b").steps.tolist() == [0, 2, 4]
    warnings = [r for r in caplog.records if "logger Recorder failed" in r.getMessage()]
    assert [r.exc_info is not None for r in warnings] == [True, False]
    assert "disk full at 2" in warnings[0].getMessage()


def test_loggers_are_checked_and_optional_packages_name_their_extra(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match=r"loggers\[0\] \(object\) has no log_snapshot"):
        tracker(tmp_path / "run", [object()])
    with pytest.raises(ValueError, match="pass log_dir"):
        TensorBoardLogger()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        TensorBoardLogger(tmp_path / "file")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'curvscope\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tb")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'curvscope\[wandb\]'"):
        WandbLogger("project")
    assert not (tmp_path / "tb").exists()


def test_no_module_imports_tensorboard_or_wandb_at_import_time():
    """Only a function body (building a logger, drawing a figure) imports the optional packages."""
    optional = ("tensorboard", "wandb", "torch.utils.tensorboard")
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        inside = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] in optional[:2] or name.startswith(optional[2]):
                    found.append((path.name, name, id(node) in inside))
    assert ("loggers.py", "torch.utils.tensorboard", True) in found
    assert ("loggers.py", "wandb", True) in found
    assert [entry for entry in found if not entry[2]] == []


def test_trainer_callbacks_pass_loggers_on(tmp_path):
    """LightningTracker(..., loggers=[...]) (its hooks driven as Lightning calls them)."""
    from types import SimpleNamespace

    from curvscope.tracking.callbacks import _LightningHooks

    model, loss_fn, data = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    recorder = Recorder()
    hooks = _LightningHooks(
        tmp_path / "run",
        loss_fn,
        data,
        "every:1",
        measurements=("top",),
        progress=False,
        loggers=[recorder],
    )
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=0, optimizers=[optimizer], logger=None
    )
    hooks.on_train_start(trainer, model)
    trainer.global_step = 1
    hooks.on_train_batch_end(trainer, model, {"loss": torch.tensor(0.5)}, None, 0)
    hooks.on_train_end(trainer, model)
    run = load_run(tmp_path / "run")
    assert [call[0] for call in recorder.calls] == run.steps.tolist() == [0, 1]
    assert [call[1]["lambda_max"] for call in recorder.calls] == run.scalars["lambda_max"].tolist()
    assert recorder.calls[1][1]["loss"] == 0.5 and recorder.closed == 1
