"""A checkpointed density run killed at random points, many times over.

Each trial starts the run in a child process, kills it (SIGKILL, and sometimes SIGTERM or
SIGINT) at a random moment after a random number of operator products, resumes it, possibly
kills the resumed run too, and finally lets a resume finish. After every kill:

* the resume succeeds (a checkpoint is never left torn or unreadable),
* the finished result equals the uninterrupted checkpointed run's bit for bit (both run one
  thread on this machine: the guarantee docs/guarantees.md states),
* and no committed step is lost: over all segments of a trial the children compute at most
  m + 2 products per kill beyond the uninterrupted run's m (the product in flight, and the
  resume's check product).

The kill points are drawn from a seeded generator; ``CURVSCOPE_FAULT_TRIALS`` multiplies the
number of trials (tests/faults/faultlib.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import TRIALS, child_env, wait

STEPS, PROBES, SEED = 40, 3, 7

CHILD = f"""
import sys, time
import numpy as np
import torch

torch.set_num_threads(1)
from curvscope.linalg import DenseOperator, spectral_density

matrix, folder, out, delay, resume = sys.argv[1:6]
delay = float(delay)


class Counted(DenseOperator):
    def matmat(self, V):
        print("P", flush=True)
        if delay:
            time.sleep(delay)
        return super().matmat(V)


density = spectral_density(
    Counted(np.load(matrix)), num_iters={STEPS}, num_probes={PROBES}, seed={SEED},
    checkpoint_dir=folder, resume=resume == "1",
)
np.savez(out, nodes=density.nodes, weights=density.weights)
print("DONE", flush=True)
"""


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The matrix, the child script and the uninterrupted checkpointed run's result."""
    folder = tmp_path_factory.mktemp("density_faults")
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    values = np.concatenate([rng.normal(0.0, 1.0, 146), [8.0, 15.0, 25.0, 40.0]])
    np.save(folder / "A.npy", (q * values) @ q.T)
    (folder / "child.py").write_text(CHILD)
    products = run_child(folder, folder / "reference", folder / "reference.npz", 0.0, False)
    assert products == STEPS
    with np.load(folder / "reference.npz") as data:
        reference = {key: data[key] for key in data.files}
    return folder, reference


def start_child(folder: Path, checkpoint: Path, out: Path, delay: float, resume: bool):
    args = [sys.executable, str(folder / "child.py"), str(folder / "A.npy"), str(checkpoint)]
    args += [str(out), str(delay), "1" if resume else "0"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, env=child_env(), text=True)


def run_child(folder, checkpoint, out, delay, resume) -> int:
    """Run a child to the end; returns its number of products."""
    child = start_child(folder, checkpoint, out, delay, resume)
    lines = child.stdout.read().split()
    code = wait(child)
    assert code == 0, f"a resume failed (exit {code}) on {checkpoint}"
    assert lines[-1] == "DONE"
    return lines.count("P")


def kill_child(folder, checkpoint, out, delay, resume, after: int, pause: float, sig) -> int:
    """Start a child, kill it ``pause`` s after its ``after``-th product; returns the products
    it started (or all of them, if it finished first)."""
    child = start_child(folder, checkpoint, out, delay, resume)
    seen = 0
    for line in child.stdout:
        if line.strip() == "P":
            seen += 1
            if seen == after:
                time.sleep(pause)
                child.send_signal(sig)
                break
    rest = child.stdout.read()  # products started before the signal landed
    seen += rest.split().count("P")
    wait(child)
    return seen


@pytest.mark.parametrize("trial", range(6 * TRIALS))
def test_killed_density_resumes_to_the_uninterrupted_result(setting, tmp_path, trial):
    folder, reference = setting
    rng = np.random.default_rng(1000 + trial)
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "result.npz"
    delay = float(rng.choice([0.0, 0.0005, 0.005]))  # per product: kills land anywhere
    kills = int(rng.integers(1, 4))
    products = 0
    for segment in range(kills):
        after = int(rng.integers(1, STEPS + 1))
        pause = float(rng.uniform(0.0, 3 * max(delay, 0.001)))
        sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
        products += kill_child(folder, checkpoint, out, delay, segment > 0, after, pause, sig)
    products += run_child(folder, checkpoint, out, 0.0, True)
    with np.load(out) as data:
        for key, value in reference.items():
            np.testing.assert_array_equal(data[key], value, err_msg=f"trial {trial}: {key}")
    assert products <= STEPS + 2 * kills, (
        f"trial {trial}: {products} products over {kills} kill(s) for a {STEPS}-step run: "
        "a resume redid committed steps"
    )
