"""``curvscope track --tensorboard DIR --wandb PROJECT``: the snapshots' values in TensorBoard's
event files and in a W&B offline run equal the run folder's."""

from __future__ import annotations

import numpy as np
import pytest
from clitools import TRACK, run_one_thread
from logreaders import isolate_wandb, read_events, wandb_history

from curvscope.tracking import load_run


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    isolate_wandb(monkeypatch, tmp_path)
    yield tmp_path
    wandb.teardown()


def test_track_tensorboard_and_wandb_options(track_module, wandb_env):
    pytest.importorskip("tensorboard")
    args = ["track", *TRACK, "--steps", "2", "--schedule", "every:2", "--lr", "0.5"]
    args += ["--measure", "top,density", "--density-iters", "6", "--density-probes", "2"]
    args += ["--out", str(wandb_env / "run"), "--tensorboard", str(wandb_env / "tb")]
    code, out, err = run_one_thread(*args, "--wandb", "curvscope-test")
    assert code == 0, err
    assert f"tensorboard --logdir {wandb_env / 'tb'}" in out
    run = load_run(wandb_env / "run")
    events = read_events(wandb_env / "tb")
    for name in ("lambda_max", "loss", "density_lambda_max"):
        logged = events.Scalars(f"curvscope/{name}")
        assert [event.step for event in logged] == run.steps.tolist() == [0, 2]
        np.testing.assert_array_equal(
            [event.value for event in logged], run.scalars[name].astype(np.float32)
        )
    assert [event.step for event in events.Histograms("curvscope/density")] == [0, 2]
    assert len(events.Images("curvscope/density_plot")) == 2
    rows = wandb_history(wandb_env)
    assert [row["curvscope/lambda_max"] for row in rows] == run.scalars["lambda_max"].tolist()
    # a file where the folder should be: one line, exit status 2
    (wandb_env / "file").write_text("")
    args = ["track", *TRACK, "--steps", "0", "--out", str(wandb_env / "run2")]
    code, out, err = run_one_thread(*args, "--tensorboard", str(wandb_env / "file"))
    assert code == 2 and err.startswith("curvscope: error: ") and "is a file" in err
