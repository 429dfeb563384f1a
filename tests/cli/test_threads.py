"""Thread defaults of the ``curvscope`` program, in subprocesses (OpenMP reads its
environment once, when torch loads it).

Unset by the user, the program gives torch as many threads as the CPUs the process may use
and makes GNU OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE, set by curvscope.program
before torch loads: ``import curvscope`` does not load torch); --threads, OMP_NUM_THREADS and
an OMP_WAIT_POLICY already set are kept. ``OMP_DISPLAY_ENV=VERBOSE`` makes the OpenMP
runtime print the spin count it actually uses (0 for passive waiting). Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from curvscope import cli
from curvscope.cli.threads import fit_threads_to_model, num_threads
from curvscope.resources import available_cpus

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads GNU OpenMP's report and the CPU affinity"
)

PROBE_MODULE = textwrap.dedent(
    """
    import json, os
    import torch

    def probe():
        # Runs as the --model factory, after the CLI chose the threads: report and stop.
        report = {
            "threads": torch.get_num_threads(),
            "policy": os.environ.get("OMP_WAIT_POLICY"),
        }
        with open(os.environ["PROBE_OUT"], "w") as handle:
            json.dump(report, handle)
        raise RuntimeError("probe done")
    """
)


def launch(tmp_path: Path, command: list[str], *options: str, **env: str) -> tuple[dict, list[str]]:
    """Run ``command density --model probemod:probe *options`` in tmp_path with a clean thread
    environment plus ``env``; returns the probe's report and OpenMP's spin counts."""
    (tmp_path / "probemod.py").write_text(PROBE_MODULE)
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_BLOCKTIME")
    }
    environ.update(PROBE_OUT=str(tmp_path / "probe.json"), OMP_DISPLAY_ENV="VERBOSE", **env)
    done = subprocess.run(
        [*command, "density", "--model", "probemod:probe", *options, "--out", str(tmp_path)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "probe done" in done.stderr, done.stderr
    spins = [
        line.split("=")[1].strip().strip("'")
        for line in done.stderr.splitlines()
        if line.strip().startswith("GOMP_SPINCOUNT")
    ]
    return json.loads((tmp_path / "probe.json").read_text()), spins


def test_python_m_curvscope_sets_passive_waiting_and_threads(tmp_path):
    report, spins = launch(tmp_path, [sys.executable, "-m", "curvscope"])
    assert report == {"threads": len(os.sched_getaffinity(0)), "policy": "PASSIVE"}
    assert spins == ["0"]  # one OpenMP start, which read the policy: its idle threads sleep


def test_import_curvscope_does_not_load_torch():
    """What lets the program set the OpenMP environment before torch loads."""
    code = "import sys, curvscope, curvscope.program; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_console_script_keeps_omp_num_threads(tmp_path):
    # torchrun sets OMP_NUM_THREADS=1 for several processes per machine: kept.
    script = Path(sys.executable).with_name("curvscope")
    if not script.exists():
        pytest.skip("the curvscope console script is not installed beside this Python")
    report, spins = launch(tmp_path, [str(script)], OMP_NUM_THREADS="1")
    assert report == {"threads": 1, "policy": "PASSIVE"}
    assert spins == ["0"]


def test_user_settings_are_kept(tmp_path):
    command = [sys.executable, "-m", "curvscope"]
    report, spins = launch(tmp_path, command, "--threads", "1", OMP_WAIT_POLICY="ACTIVE")
    assert report == {"threads": 1, "policy": "ACTIVE"}
    assert len(spins) == 1 and spins[0] != "0"


def test_num_threads_default_and_overrides():
    args = cli.build_parser().parse_args(["density"])
    assert num_threads(args, environ={}) == available_cpus() >= 1
    assert num_threads(args, environ={"OMP_NUM_THREADS": "3"}) is None
    args = cli.build_parser().parse_args(["density", "--threads", "3"])
    assert num_threads(args, environ={"OMP_NUM_THREADS": "1"}) == 3


def test_main_called_from_python_leaves_the_environment_alone(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["top", "--loss", "hinge"]) == 2  # fails after parsing
    assert "OMP_WAIT_POLICY" not in os.environ
    capsys.readouterr()


def test_small_models_get_one_thread_by_default():
    """Below ONE_THREAD_BELOW parameters sleeping threads cost more than they give."""
    before = torch.get_num_threads()
    small, large = torch.nn.Linear(10, 10), torch.nn.Linear(400, 250)  # 110 and 100,250
    try:
        for default, model, expected in [
            (True, small, 1),
            (True, large, 2),
            (False, small, 2),  # --threads or OMP_NUM_THREADS chose: kept
        ]:
            torch.set_num_threads(2)
            args = argparse.Namespace(default_threads=default)
            fit_threads_to_model(args, model)
            assert torch.get_num_threads() == expected, (default, model)
    finally:
        torch.set_num_threads(before)
    args = cli.build_parser().parse_args(["density"])
    assert not getattr(args, "default_threads", False)  # set by main() only
