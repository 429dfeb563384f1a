"""``curvscope trace``: Hutch++ and Hutchinson with a standard error, the default results folder,
and a model file named by path with an unpack hook."""

from __future__ import annotations

import pytest
from clitools import run

from curvscope import TraceEstimate


@pytest.mark.parametrize("method, probes", [("hutch++", "6"), ("hutchinson", "4")])
def test_trace_prints_value_and_standard_error(tmp_path, capsys, method, probes):
    args = ["trace", "--method", method, "--probes", probes, "--out", str(tmp_path)]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    estimate = TraceEstimate.load(tmp_path / "trace")
    assert estimate.meta["method"] == method
    assert estimate.std_error >= 0
    assert f"{estimate.value:.6g} ± " in out


def test_default_results_folder_is_results_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "trace", "--method", "hutchinson", "--probes", "2")
    assert code == 0, err
    assert (tmp_path / "results" / "trace" / "trace.json").is_file()


def test_file_path_import_and_unpack_batch_hook(tmp_path, capsys, user_module):
    args = ["trace", "--method", "hutchinson", "--probes", "4", "--out", str(tmp_path)]
    args += ["--model", f"{user_module}:build", "--data", f"{user_module}:dict_batches"]
    args += ["--unpack-batch", "usermod:unpack", "--loss", "mse"]
    code, _out, err = run(capsys, *args)
    assert code == 0, err
    assert TraceEstimate.load(tmp_path / "trace").meta["data"].endswith("usermod.py:dict_batches")
