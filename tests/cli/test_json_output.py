"""``--json`` on every command: stdout is exactly one strict JSON object whose numbers are those
of the files the command saved, the summary lines go to stderr, and a failure prints nothing on
stdout (the one-line error on stderr, status 2)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from clitools import SMALL, STRUCTURE, TINY, TRACK, assert_one_line_error, run, run_one_thread

from curvscope import Eigenpairs, SpectralDensity, TraceEstimate
from curvscope.analysis import BlockSpectra, GradientOverlap, SpectrumStructure
from curvscope.cli import jsonout, options

USER = ["--model", "usermod:build", "--data", "usermod:batches", "--loss", "usermod:half_mse"]
PROBLEM_KEYS = {
    "model",
    "data",
    "loss",
    "params",
    "operator",
    "n",
    "num_samples",
    "dtype",
    "device",
    "seed",
}


def strict(text: str) -> Any:
    """The one JSON object of ``text`` (one line), refusing NaN and Infinity."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    lines = text.splitlines()
    assert len(lines) == 1, text
    record = json.loads(lines[0], parse_constant=refuse)
    assert isinstance(record, dict)
    return record


def checked(code: int, out: str, err: str, command: str) -> dict[str, Any]:
    assert code == 0, err
    record = strict(out)
    assert record["command"] == command
    assert f"curvscope {command}" in err  # the summary went to stderr
    assert isinstance(record["wall_time_s"], float) and record["wall_time_s"] > 0
    return record


def test_density_top_and_trace_print_the_numbers_they_saved(tmp_path, capsys, user_module):
    args = ["density", *USER, "--iters", "6", "--probes", "2", "--mark-top", "2", "--structure"]
    record = checked(*run(capsys, *args, "--json", "--out", str(tmp_path / "d")), "density")
    density = SpectralDensity.load(tmp_path / "d" / "density")
    assert record["density"] == density.summary()
    assert record["density"]["n"] == 16 and record["density"]["num_probes"] == 2
    assert record["problem"] == {
        "model": "usermod:build",
        "data": "usermod:batches",
        "loss": "usermod:half_mse",
        "params": None,
        "operator": "HessianOperator",
        "n": 16,
        "num_samples": 20,
        "dtype": "float64",
        "device": "cpu",
        "seed": 0,
    }
    saved = json.loads((tmp_path / "d" / "density.json").read_text())
    assert saved["summary"] == record["density"]
    assert record["top"] == Eigenpairs.load(tmp_path / "d" / "top_eigenpairs").summary()
    structure = SpectrumStructure.load(tmp_path / "d" / "density.structure")
    assert record["structure"]["lambda_max"] == structure.lambda_max
    assert record["structure"]["outliers"] == structure.outliers.tolist()
    assert {str(tmp_path / "d" / f) for f in ("density.npz", "density.png")} <= set(record["files"])

    args = ["top", *USER, "-k", "2", "--json", "--out", str(tmp_path / "t")]
    record = checked(*run(capsys, *args), "top")
    pairs = Eigenpairs.load(tmp_path / "t" / "eigenpairs")
    assert record["eigenpairs"]["values"] == pairs.values.tolist()
    assert record["eigenpairs"]["residuals"] == pairs.residuals.tolist()
    assert record["eigenpairs"]["converged"] == [True, True]
    assert record["eigenpairs"]["num_products"] == pairs.meta["num_products"]
    assert set(record["problem"]) == PROBLEM_KEYS

    args = ["trace", *USER, "--probes", "9", "--json", "--out", str(tmp_path / "tr")]
    record = checked(*run(capsys, *args), "trace")
    estimate = TraceEstimate.load(tmp_path / "tr" / "trace")
    assert record["trace"]["value"] == estimate.value
    assert record["trace"]["std_error"] == estimate.std_error
    assert record["trace"]["per_parameter"] == pytest.approx(estimate.value / 16, rel=1e-15)
    assert record["trace"]["method"] == "hutch++"


def test_structure_commands_print_the_numbers_they_saved(tmp_path, structure_module):
    out = tmp_path / "split"
    args = ["decompose", *STRUCTURE, "--iters", "6", "--probes", "1", "--json", "--out", str(out)]
    record = checked(*run_one_thread(*args), "decompose")
    assert list(record["terms"])[:3] == ["hessian", "ggn", "residual"]
    for name, term in record["terms"].items():
        assert term["density"] == SpectralDensity.load(out / f"density_{name}").summary()
        structure = SpectrumStructure.load(out / f"structure_{name}")
        assert term["structure"]["bulk_max"] == structure.bulk_max
    saved = json.loads((out / "decompose.json").read_text())
    assert record["residual_over_ggn"] == saved["residual_over_ggn"]
    assert (
        record["exact_eigenvalues"]["class_means"]
        == saved["summary"]["exact_eigenvalues"]["class_means"]
    )
    assert record["problem"]["n"] == 610 and record["problem"]["num_samples"] == 120

    out = tmp_path / "overlap"
    args = ["overlap", *STRUCTURE, "-k", "3", "--json", "--out", str(out)]
    record = checked(*run_one_thread(*args), "overlap")
    result = GradientOverlap.load(out / "overlap")
    assert record["overlap"]["overlap"] == result.overlap
    assert record["overlap"]["shares"] == result.shares.tolist()
    assert record["overlap"]["eigenvalues"] == result.eigenvalues.tolist()
    assert record["subspace"] is None

    out = tmp_path / "blocks"
    args = ["blocks", *STRUCTURE, *TINY, "--json", "--out", str(out)]
    record = checked(*run_one_thread(*args), "blocks")
    table = BlockSpectra.load(out / "blocks")
    assert list(record["blocks"]) == table.names
    for name in table.names:
        assert record["blocks"][name]["density"] == table.densities[name].summary()
        assert record["blocks"][name]["params"] == table.groups[name]
    assert set(record["problem"]) == PROBLEM_KEYS
    assert record["problem"]["n"] == 610 and record["problem"]["num_samples"] == 120


def test_track_and_plot_print_the_run(tmp_path, track_module):
    folder = tmp_path / "run"
    args = ["track", *TRACK, "--steps", "2", "--schedule", "every:2", "--measure", "top,trace"]
    record = checked(*run_one_thread(*args, *SMALL, "--json", "--out", str(folder)), "track")
    assert record["steps"] == [0, 2] and record["snapshots_taken"] == 2
    assert record["run_dir"] == str(folder)
    assert record["training"]["optimizer"] == "sgd" and record["training"]["measure"] == [
        "top",
        "trace",
    ]
    assert set(record["problem"]) == PROBLEM_KEYS and record["problem"]["num_samples"] == 120
    assert record["problem"]["dtype"] == "float64"  # a float32 model's products on the CPU
    assert record["problem"]["n"] == 610
    from curvscope.tracking import load_run

    tracked = load_run(folder)
    np.testing.assert_array_equal(record["scalars"]["lambda_max"], tracked.scalars["lambda_max"])
    assert record["files"] == [str(folder / "run.json")]

    code, out, err = run_one_thread("plot", str(folder), "--json")
    assert code == 0, err
    record = strict(out)
    assert record["command"] == "plot" and record["num_snapshots"] == 2
    assert record["files"] == [str(folder / "plots" / f) for f in ("sharpness.png", "traces.png")]
    assert "curvscope plot" in err


def test_errors_with_json_print_nothing_on_stdout(tmp_path, capsys, user_module):
    code, out, err = run(capsys, "top", *USER, "-k", "99", "--json", "--out", str(tmp_path))
    assert out == ""
    assert_one_line_error(code, out, err, "k must satisfy 1 <= k < n = 16")
    code, out, err = run(capsys, "density", "--iters", "0", "--json")
    assert out == ""
    assert_one_line_error(code, out, err, "--iters")


def test_ranks_other_than_0_print_no_json(tmp_path, capsys, user_module, monkeypatch):
    monkeypatch.setattr(options, "is_distributed", lambda: True)
    monkeypatch.setattr(options, "is_main_process", lambda: False)
    code, out, err = run(capsys, "top", *USER, "-k", "1", "--json", "--out", str(tmp_path))
    assert code == 0 and out == "" and err == ""
    assert not (tmp_path / "eigenpairs.npz").exists()  # rank > 0 writes to a scratch folder


def test_plain_writes_strict_json():
    value = {"a": np.array([1.0, np.nan]), "b": np.float32(np.inf), "c": np.bool_(True)}
    assert jsonout.plain(value) == {"a": [1.0, None], "b": None, "c": True}


def test_every_command_takes_json():
    from curvscope.cli import COMMANDS, build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    # one command per module of COMMANDS, named like it (report's module is report_command:
    # cli/report.py is the printed text the commands share)
    names = {module.__name__.rsplit(".", 1)[1].removesuffix("_command") for module in COMMANDS}
    assert set(commands.choices) == names
    for name, sub in commands.choices.items():
        assert "--json" in sub.format_help(), name
