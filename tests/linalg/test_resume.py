"""A checkpointed SLQ run killed with SIGKILL resumes to the same numbers as an uninterrupted
run: bit for bit when both processes run the same products on the same machine, and to
rounding when the products take another BLAS code path (another CPU, thread count or
alignment)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curvscope.linalg import spectral_density

CHILD = """
import sys, time, numpy as np
from curvscope.linalg import DenseOperator, spectral_density

class Slow(DenseOperator):  # the parent's products (DenseOperator), slowed down to be killed
    def matmat(self, V):
        time.sleep(0.05)
        return super().matmat(V)

A = np.load(sys.argv[1])
spectral_density(Slow(A), num_iters=60, num_probes=3, seed=4, checkpoint_dir=sys.argv[2])
"""


class Misaligned:
    """The matrix's products through another MKL code path: its data starts 8 bytes past a
    16-byte boundary (as numpy arrays may), which changes the rounding of ``A @ V``."""

    def __init__(self, A: np.ndarray) -> None:
        buffer = torch.empty(A.size + 1, dtype=torch.float64)
        self.A = buffer[1:].view(A.shape)
        self.A.copy_(torch.from_numpy(A))
        assert self.A.data_ptr() % 16 == 8
        self.shape, self.dtype, self.device = A.shape, self.A.dtype, self.A.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


def planted_matrix(n: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([rng.normal(0.0, 1.0, n - 3), [10.0, 20.0, 30.0]])
    return (Q * values) @ Q.T


def kill_at_step(tmp_path: Path, A: np.ndarray, kill_after: int) -> Path:
    """Run the checkpointed child on ``A`` and SIGKILL it once it has reached ``kill_after``."""
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
    return checkpoint


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
    """Bit for bit: the child and this process run the same products (a DenseOperator of the
    same matrix, aligned by construction) with the same thread count (conftest: 1)."""
    A = planted_matrix()
    checkpoint = kill_at_step(tmp_path, A, kill_after)
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


def test_resumed_on_another_blas_code_path_agrees_to_rounding(tmp_path):
    """What a resume on another machine (other CPU kernels, thread count) gives: the products
    after the kill round differently, so the numbers agree to rounding, not bit for bit."""
    A = planted_matrix()
    checkpoint = kill_at_step(tmp_path, A, 17)
    resumed = spectral_density(
        Misaligned(A), num_iters=60, num_probes=3, seed=4, checkpoint_dir=checkpoint, resume=True
    )
    reference = spectral_density(
        A, num_iters=60, num_probes=3, seed=4, checkpoint_dir=tmp_path / "ref"
    )
    scale = np.abs(A).sum(axis=1).max()
    assert np.nanmax(np.abs(resumed.nodes - reference.nodes)) <= 1e-10 * scale
    assert np.abs(resumed.weights - reference.weights).max() <= 1e-8


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
