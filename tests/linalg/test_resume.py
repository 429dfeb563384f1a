"""A checkpointed SLQ run killed with SIGKILL resumes to the same numbers as an uninterrupted
run, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from curvscope.linalg import spectral_density

CHILD = """
import sys, time, numpy as np, torch
from curvscope.linalg import spectral_density

class Slow:
    def __init__(self, A):
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
    def matmat(self, V):
        time.sleep(0.05)
        return self.A @ V

A = torch.from_numpy(np.load(sys.argv[1]))
spectral_density(Slow(A), num_iters=60, num_probes=3, seed=4, checkpoint_dir=sys.argv[2])
"""


def planted_matrix(n: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([rng.normal(0.0, 1.0, n - 3), [10.0, 20.0, 30.0]])
    return (Q * values) @ Q.T


def wait_for_step(state: Path, step: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reached = json.loads(state.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            reached = -1
        if reached >= step:
            return reached
        time.sleep(0.01)
    raise TimeoutError(f"the child never reached step {step}")


@pytest.mark.parametrize("kill_after", [3, 17])
def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path, kill_after):
    A = planted_matrix()
    matrix_file = tmp_path / "A.npy"
    np.save(matrix_file, A)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    checkpoint = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, str(script), str(matrix_file), str(checkpoint)])
    try:
        reached = wait_for_step(checkpoint / "state.json", kill_after)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert reached < 59, "the child finished before it was killed: the test proves nothing"

    resumed = spectral_density(
        A, num_iters=60, num_probes=3, seed=4, checkpoint_dir=checkpoint, resume=True
    )
    reference = spectral_density(
        A, num_iters=60, num_probes=3, seed=4, checkpoint_dir=tmp_path / "ref"
    )
    assert np.array_equal(resumed.nodes, reference.nodes, equal_nan=True)
    assert np.array_equal(resumed.weights, reference.weights)
    # and the checkpointed run is the ordinary one up to the reorthogonalization's rounding
    plain = spectral_density(A, num_iters=60, num_probes=3, seed=4)
    assert np.nanmax(np.abs(plain.nodes - reference.nodes)) <= 1e-10 * np.abs(A).sum(axis=1).max()


def test_resume_refuses_another_run(tmp_path):
    A = planted_matrix(40)
    spectral_density(A, num_iters=10, num_probes=2, seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="start vectors differ"):
        spectral_density(
            A, num_iters=10, num_probes=2, seed=1, checkpoint_dir=tmp_path, resume=True
        )
    with pytest.raises(ValueError, match="another run"):
        spectral_density(
            A, num_iters=12, num_probes=2, seed=0, checkpoint_dir=tmp_path, resume=True
        )
    with pytest.raises(ValueError, match="checkpoint_dir"):
        spectral_density(A, num_iters=10, num_probes=2, resume=True)
