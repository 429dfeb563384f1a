"""The ``curvscope`` program as a whole: --help, --version, --debug and the installed entry
point."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from clitools import assert_one_line_error, run, run_one_thread

from curvscope.cli import main


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "top", "--loss", "hinge", "--debug", "--out", str(tmp_path))
    assert code == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("curvscope: error: unknown --loss")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "examples:" in out
    for command in ("density", "top", "trace"):
        assert main([command, "--help"]) == 0
        assert "--model" in capsys.readouterr().out


def test_help_lists_the_structure_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("decompose", "overlap", "blocks"):
        assert command in out
        assert main([command, "--help"]) == 0
        assert "--model" in capsys.readouterr().out


def test_entry_point_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("curvscope") == "curvscope.program:main"
    done = subprocess.run(
        [sys.executable, "-m", "curvscope", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: curvscope" in done.stdout


@pytest.mark.parametrize(
    "args, unknown",
    [(("top", "--k", "3"), "--k"), (("density", "--iter", "5"), "--iter")],
)
def test_options_are_never_abbreviated(args, unknown):
    """``top --k 3`` once ran as ``--keep-graphs 3`` (argparse's prefix matching)."""
    code, out, err = run_one_thread(*args)
    assert_one_line_error(code, out, err, f"unrecognized arguments: {unknown}")
