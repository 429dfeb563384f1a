"""``curvscope track``: a tracked training run, resumed to the series of an uninterrupted one,
Adam's preconditioned sharpness, and the one-line errors of its options.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits) and the measurements
use a few Lanczos steps and probes, so the whole file runs in a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
from clitools import SIGN, series
from clitools import TRACK as PROBLEM
from clitools import run_one_thread as run

from curvscope.tracking import load_run
from curvscope.tracking.training import TRAIN_STATE


def test_track_writes_a_loadable_run(tracked):
    folder, out = tracked
    run_, values = series(folder)
    assert run_.steps.tolist() == [0, 2, 4]
    expected = {
        "loss",
        "accuracy",
        "lr",
        "lambda_max",
        "sharpness",
        "stability_threshold",
        "edge_ratio",
        "trace",
        "trace_std_error",
        "density_lambda_max",
        "ntk_trace",
        "ntk_trace_std_error",
    }
    assert expected <= set(values)
    np.testing.assert_allclose(values["stability_threshold"], 2 / 0.5, rtol=1e-12)
    np.testing.assert_array_equal(values["sharpness"], values["lambda_max"])
    assert np.all(np.diff(values["loss"]) < 0), "full-batch GD at a small lr lowers the loss"
    assert len(run_.densities) == 3 and run_.densities[4].n == 610
    assert run_.config["extra"]["batch_size"] == 120  # full batch: B = N for the K of SGD
    assert run_.config["extra"]["train"]["optimizer"] == "sgd"
    assert (folder / TRAIN_STATE).is_file()
    lines = out.strip().splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("step ")] == [
        "step 0",
        "step 2",
        "step 4",
    ]
    assert "sharpness" in lines[1] and "/ 2/eta 4 =" in lines[1]
    assert lines[-1] == f"run folder: {folder}"


def test_resume_gives_the_series_of_an_uninterrupted_run(track_module, tmp_path):
    # Heavy ball on minibatches of 30 (4 per epoch): the series depends on the momentum
    # buffers and on which samples each step drew, so both must be restored exactly.
    settings = [*PROBLEM, "--optimizer", "momentum", "--lr", "0.3", "--momentum", "0.8"]
    settings += ["--batch-size", "30", "--schedule", "every:2", "--measure", "top,stability,trace"]
    settings += ["--trace-probes", "12", "--top-k", "2"]
    code, _, err = run("track", *settings, "--steps", "9", "--out", str(tmp_path / "a"))
    assert code == 0, err

    code, _, err = run("track", *settings, "--steps", "5", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert load_run(tmp_path / "b").steps.tolist() == [0, 2, 4]
    # Resume with no settings but the steps: the stored ones are used.
    code, out, err = run("track", "--resume", "--steps", "9", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "steps 5 to 9" in out and "snapshots 2 taken now, 5 in the run" in out

    run_a, values_a = series(tmp_path / "a")
    run_b, values_b = series(tmp_path / "b")
    assert run_a.steps.tolist() == run_b.steps.tolist() == [0, 2, 4, 6, 8]
    assert set(values_a) == set(values_b)
    for name in values_a:
        np.testing.assert_array_equal(values_b[name], values_a[name], err_msg=name)
    np.testing.assert_allclose(values_a["stability_threshold"], 2 * 1.8 / 0.3, rtol=1e-12)

    code, _, err = run("track", "--resume", "--lr", "0.1", "--out", str(tmp_path / "b"))
    assert code == 2
    assert err.startswith("curvscope: error: cannot resume") and "settings differ" in err
    assert len(err.strip().splitlines()) == 1


def test_adam_sharpness_is_preconditioned(track_module, tmp_path):
    args = ["track", *PROBLEM, "--optimizer", "adam", "--lr", "0.01", "--steps", "3"]
    args += ["--schedule", "every:2:1", "--measure", "stability", "--out", str(tmp_path)]
    code, out, err = run(*args)
    assert code == 0, err
    run_, values = series(tmp_path)
    assert run_.steps.tolist() == [1, 3]
    # (1 + beta1)(2) / ((1 - beta1) eta) with beta1 = 0.9, eta = 0.01 (Cohen et al. 2022).
    np.testing.assert_allclose(values["stability_threshold"], 1.9 * 2 / (0.1 * 0.01), rtol=1e-9)
    assert "lambda_max" not in values and np.all(values["sharpness"] > 0)
    assert "Adam threshold" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["track", "--optimizer", "rmsprop"], "invalid choice"),
        (["track", "--measure", "top,curvature"], "unknown measurement 'curvature'"),
        (["track", "--measure", "stochastic_edge"], "one output per sample"),
        (["track", "--schedule", "sometimes"], "bad schedule"),
        (["track", "--lr", "-1"], "must be positive"),
        (["track", "--batch-size", "0"], "must be at least 1"),
        (["track", "--momentum", "0.9"], "--momentum is for"),
        (["track", "--optimizer", "momentum", "--momentum", "1.5"], "must lie in [0, 1)"),
        (["track", "--batch-size", "500"], "exceeds the 120 training samples"),
        (["track", "--optimizer", "adam", "--measure", "stability"], "start the schedule"),
        (["track", "--resume"], "--resume needs --out"),
        (["track", "--model", "trackmod:nothing"], "has no attribute"),
        (["track", "--loss", "hinge"], "unknown --loss"),
        (["track", "--mea", "top"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(track_module, tmp_path, args, message):
    if args[0] == "track" and "--model" not in args:
        args = [*args, "--data", "trackmod:data"]
    if "--resume" not in args and args[0] == "track":
        args = [*args, "--out", str(tmp_path / "run")]
    code, out, err = run(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_existing_run_needs_resume_and_empty_run_has_nothing_to_plot(track_module, tmp_path):
    args = ["track", *PROBLEM, "--steps", "0", "--measure", "top", "--out", str(tmp_path)]
    assert run(*args)[0] == 0
    code, _, err = run(*args)
    assert code == 2 and "already holds a run: pass --resume" in err
    # A run whose schedule never came due has no snapshots.
    empty = tmp_path / "empty"
    args = ["track", *PROBLEM, "--steps", "1", "--schedule", "steps:5", "--measure", "top"]
    assert run(*args, "--out", str(empty))[0] == 0
    code, _, err = run("plot", str(empty))
    assert code == 2 and "holds no snapshots" in err


def test_stochastic_edge_on_a_one_output_model(track_module, tmp_path):
    """K of SGD (exact for this tiny problem: standard error 0) with its exact edge ||Q||."""
    args = ["track", *SIGN, "--batch-size", "8", "--lr", "0.05", "--steps", "4"]
    args += ["--schedule", "every:2", "--measure", "top,stochastic_edge", "--out", str(tmp_path)]
    code, out, err = run(*args)
    assert code == 0, err
    _, values = series(tmp_path)
    assert {"stochastic_K", "stochastic_K_std_error", "stochastic_kernel_norm"} <= set(values)
    assert np.all(values["stochastic_K"] > 0) and np.all(np.isfinite(values["stochastic_K"]))
    assert np.all(values["stochastic_K_std_error"] == 0)
    assert np.all(values["stochastic_K"] <= values["stochastic_kernel_norm"] * (1 + 1e-9))
    assert "K " in next(line for line in out.splitlines() if line.startswith("step 2"))
