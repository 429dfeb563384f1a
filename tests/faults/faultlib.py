"""Shared settings of the fault suite: how many kill trials, and a child-process runner.

``CURVSCOPE_FAULT_TRIALS`` (default 1) multiplies the number of kill trials of every test;
CI runs the default, a soak run sets it higher. The trials are seeded: the kill points of a
run are the same every time it is repeated with the same multiplier.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

TRIALS = max(1, int(os.environ.get("CURVSCOPE_FAULT_TRIALS", "1")))

#: The child's environment: one thread (results bit-identical by construction between runs),
#: the repository's sources first on the path.
SRC = str(Path(__file__).resolve().parents[2] / "src")


def child_env(*extra_paths: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_paths, SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def wait(child: subprocess.Popen, timeout: float = 120.0) -> int:
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail(f"child {child.args} did not finish within {timeout} s")


def poll_until(condition, timeout: float = 120.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
