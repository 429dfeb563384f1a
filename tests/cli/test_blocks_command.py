"""``curvscope blocks``: one density per layer or per group of parameters.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits in two batches) and the
densities use a few Lanczos steps and probes, so the file runs in seconds."""

from __future__ import annotations

import pytest
from clitools import STRUCTURE as PROBLEM
from clitools import TINY, assert_one_line_error
from clitools import run_one_thread as run

from curvscope.analysis import BlockSpectra
from curvscope.cli.blocks import parse_groups


def test_blocks_default_layers_and_user_groups(tmp_path, structure_module):
    code, out, err = run("blocks", *PROBLEM, *TINY, "--out", str(tmp_path / "layers"))
    assert code == 0, err
    table = BlockSpectra.load(tmp_path / "layers" / "blocks")
    assert table.names == ["0", "2"]
    assert [s.n for s in table.structures.values()] == [520, 90]
    assert (tmp_path / "layers" / "blocks.png").exists()
    lines = (tmp_path / "layers" / "blocks.csv").read_text().splitlines()
    assert lines[0].startswith("group,n,") and len(lines) == 3
    assert (tmp_path / "layers" / "blocks.txt").read_text().splitlines()[0].startswith("group")
    assert "neg. mass" in out and "2 diagonal Hessian blocks" in out
    args = ["--group", "weights=0.weight,2.weight", "--group", "2.bias", "--operator", "ggn"]
    code, out, err = run("blocks", *PROBLEM, *TINY, *args, "--out", str(tmp_path / "groups"))
    assert code == 0, err
    table = BlockSpectra.load(tmp_path / "groups" / "blocks")
    assert table.groups == {"weights": ["0.weight", "2.weight"], "2.bias": ["2.bias"]}
    assert table.meta["operator"] == "GGNOperator"


def test_parse_groups():
    assert parse_groups(None) is None
    assert parse_groups(["a=0,2", "4"]) == {"a": ["0", "2"], "4": ["4"]}


@pytest.mark.parametrize(
    "args, message",
    [
        (["blocks", "--params", "0.weight"], "not --params"),
        (["blocks", "--group", "=0.weight"], "--group '=0.weight'"),
        (["blocks", "--group", "x=no.such"], "neither a parameter nor a module"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, structure_module, args, message):
    full = [args[0], *PROBLEM, *args[1:]] if "--model" not in args else args
    assert_one_line_error(*run(*full, "--out", str(tmp_path)), message)


@pytest.mark.parametrize(
    "operator, name, what",
    [
        ("fisher", "FisherOperator", "Fisher"),
        ("empirical-fisher", "EmpiricalFisherOperator", "empirical Fisher"),
    ],
)
def test_blocks_of_the_fisher(tmp_path, structure_module, operator, name, what):
    args = ["--group", "head=2", "--operator", operator, "--out", str(tmp_path)]
    code, out, err = run("blocks", *PROBLEM, *TINY, *args)
    assert code == 0, err
    table = BlockSpectra.load(tmp_path / "blocks")
    assert table.meta["operator"] == name
    assert f"1 diagonal {what} blocks" in out
    # a Fisher is positive semi-definite: no negative mass beyond rounding
    assert table.structures["head"].negative_mass_band == 0.0
