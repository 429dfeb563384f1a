"""Fixtures of the CLI tests: the users' own modules the commands import (``usermod``,
``structmod``, ``trackmod``), and one tracked run that several tests read."""

from __future__ import annotations

import sys
import textwrap

import pytest
from clitools import ALL, HOSTILE, SMALL, TRACK, run_one_thread

# A tiny problem whose Hessian we can build densely: a 3 -> 3 linear layer plus bias (n = 12)
# and a 3 -> 1 head (n = 4) with a softplus in between, MSE loss on 20 samples in 3 batches.
USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 1))

    def batches():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(20, 3, generator=g)
        y = torch.randn(20, 1, generator=g)
        return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 20, 8)]

    def dict_batches():
        return [{"x": x, "y": y} for x, y in batches()]

    def unpack(batch):
        return batch["x"], batch["y"]

    def wide():
        return nn.Linear(5, 1)

    def half_mse(outputs, targets):
        return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()

    not_callable = 3
    """
)

STRUCTURE_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from curvscope import zoo

    def model():
        return zoo.digits_mlp(hidden=(8,), seed=0)

    def data():
        return zoo.digits_data(batch_size=60, num_samples=120)

    def regressor():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 1))

    def regression_data():
        return [(x, y.float()[:, None]) for x, y in data()]

    def half_ce(outputs, targets):
        return 0.5 * torch.nn.functional.cross_entropy(outputs, targets)
    """
)

TRACK_MODULE = textwrap.dedent(
    """
    from curvscope import zoo

    def model():
        return zoo.digits_mlp(hidden=(8,), seed=0)

    def data():
        return zoo.digits_subset(num_samples=120, batch_size=60)

    def sign_model():
        import torch
        from torch import nn

        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1))

    def sign_data():
        return zoo.digits_sign_data(num_samples=120)
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``usermod`` importable from a folder on sys.path, as a user's own file would be."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "usermod.py"
    sys.modules.pop("usermod", None)


@pytest.fixture(scope="session")
def structure_module(tmp_path_factory):
    """``structmod`` (a 64-8-10 tanh MLP on 120 digits, a regressor) on sys.path."""
    folder = tmp_path_factory.mktemp("pkg")
    (folder / "structmod.py").write_text(STRUCTURE_MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("structmod", None)


@pytest.fixture(scope="session")
def track_module(tmp_path_factory):
    """``trackmod`` (a 64-8-10 tanh MLP on 120 digits) on sys.path."""
    folder = tmp_path_factory.mktemp("pkg")
    (folder / "trackmod.py").write_text(TRACK_MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("trackmod", None)


@pytest.fixture(scope="session")
def tracked(track_module, tmp_path_factory):
    """A full-batch GD run with every measurement: snapshots at steps 0, 2, 4."""
    folder = tmp_path_factory.mktemp("track") / "run"
    args = ["track", *TRACK, "--steps", "4", "--schedule", "every:2", "--lr", "0.5"]
    code, out, err = run_one_thread(*args, "--measure", ALL, *SMALL, "--out", str(folder))
    assert code == 0, err
    return folder, out


#: The folders of ``all_results``: command -> its options (with STRUCTURE and TINY).
REPORTED = {
    "density": ["--mark-top", "2", "--structure"],
    "top": ["-k", "3"],
    "trace": ["--probes", "12"],
    "overlap": ["-k", "3"],
    "decompose": [],
    "blocks": [],
}


@pytest.fixture(scope="session")
def all_results(structure_module, tmp_path_factory):
    """One folder with a results folder per command (structmod's 610-parameter MLP on 120
    digits, tiny settings): ``density/``, ``top/``, ``trace/``, ``overlap/``, ``decompose/``,
    ``blocks/``."""
    from clitools import STRUCTURE, TINY

    folder = tmp_path_factory.mktemp("results")
    for command, extra in REPORTED.items():
        slq = TINY if command in ("density", "decompose", "blocks") else []
        out = str(folder / command)
        code, _, err = run_one_thread(command, *STRUCTURE, *slq, *extra, "--out", out)
        assert code == 0, err
    return folder


@pytest.fixture(scope="session")
def results_report(all_results):
    """``curvscope report`` of ``all_results`` with the title and trace's model set to
    :data:`HOSTILE`: (the page, stdout)."""
    import json

    trace_json = all_results / "trace" / "trace.json"
    meta = json.loads(trace_json.read_text())
    trace_json.write_text(json.dumps({**meta, "model": HOSTILE}))
    code, out, err = run_one_thread("report", str(all_results), "--title", HOSTILE)
    assert code == 0, err
    return all_results / "report.html", out


@pytest.fixture(scope="session")
def run_report(tracked):
    """``curvscope report`` of the ``tracked`` run into run.html beside it: (page, stdout)."""
    folder, _ = tracked
    page = folder.parent / "run.html"
    code, out, err = run_one_thread("report", str(folder), "--out", str(page))
    assert code == 0, err
    return page, out
