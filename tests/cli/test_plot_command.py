"""``curvscope plot``: the figures of a tracked run folder.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits) and the measurements
use a few Lanczos steps and probes, so the whole file runs in a few seconds."""

from __future__ import annotations

import pytest
from clitools import run_one_thread as run


def test_plot_writes_the_pngs(tracked, tmp_path):
    folder, _ = tracked
    code, out, err = run("plot", str(folder), "--out", str(tmp_path / "figures"))
    assert code == 0, err
    for name in ("sharpness.png", "density_evolution.png", "traces.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in out
    code, _, err = run("plot", str(folder))  # default: RUN_DIR/plots
    assert code == 0, err
    assert (folder / "plots" / "sharpness.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["plot", "no/such/run"], "is not a run folder"),
        (["plot"], "required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    code, out, err = run(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
