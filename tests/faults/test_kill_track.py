"""``curvscope track`` killed at random points, many times over.

Each trial starts a tracked training run (heavy ball on minibatches, so the series depends on
the momentum buffers, the batches drawn and the RNG), kills it with SIGKILL, SIGTERM or SIGINT
at a random moment after a random number of committed snapshots, resumes it with ``--resume``
(sometimes killing the resumed run too) and finally lets a resume finish. After every trial:

* every resume succeeded (exit 0),
* the run equals an uninterrupted run's series bit for bit (one thread on one machine: the
  guarantee docs/guarantees.md states) and its folder has no problems,
* and no committed snapshot was lost or rewritten: each snapshot seen committed before a kill
  is still there with the same ``scalars.json`` bytes.

Kill points come from a seeded generator; ``CURVSCOPE_FAULT_TRIALS`` multiplies the trials.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import TRIALS, child_env, poll_until, wait

from curvscope.tracking import load_run

USER_MODULE = textwrap.dedent(
    """
    from curvscope import zoo

    def model():
        return zoo.digits_mlp(hidden=(8,), seed=0)

    def data():
        return zoo.digits_subset(num_samples=120, batch_size=60)
    """
)
SETTINGS = ["--model", "faultmod:model", "--data", "faultmod:data", "--optimizer", "momentum"]
SETTINGS += ["--lr", "0.3", "--momentum", "0.8", "--batch-size", "30", "--steps", "14"]
SETTINGS += ["--schedule", "every:2", "--measure", "top,trace", "--trace-probes", "12"]
SETTINGS += ["--no-progress", "--threads", "1"]
SNAPSHOTS = 8  # steps 0, 2, ..., 14


def start(folder: Path, out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "curvscope", "track", *SETTINGS, "--out", str(out)]
    if resume:
        args.append("--resume")
    return subprocess.Popen(
        args,
        env=child_env(str(folder)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed(out: Path) -> dict[str, str]:
    """Committed snapshot folder name -> sha256 of its scalars.json."""
    snapshots = out / "snapshots"
    if not snapshots.is_dir():
        return {}
    found = {}
    for entry in snapshots.iterdir():
        if entry.name.startswith("step_"):
            found[entry.name] = hashlib.sha256((entry / "scalars.json").read_bytes()).hexdigest()
    return found


def series(out: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    run = load_run(out)
    assert run.problems == [], run.problems
    values = {
        name: array
        for name, array in run.scalars.items()
        if not name.startswith("time_") and name != "unix_time"
    }
    return run.steps.tolist(), values


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("track_faults")
    (folder / "faultmod.py").write_text(USER_MODULE)
    child = start(folder, folder / "reference", resume=False)
    code = wait(child)
    assert code == 0, child.stderr.read()
    return folder, series(folder / "reference")


@pytest.mark.parametrize("trial", range(4 * TRIALS))
def test_killed_track_resumes_to_the_uninterrupted_series(setting, tmp_path, trial):
    folder, (reference_steps, reference) = setting
    assert len(reference_steps) == SNAPSHOTS
    rng = np.random.default_rng(2000 + trial)
    out = tmp_path / "run"
    seen: dict[str, str] = {}
    for segment in range(int(rng.integers(1, 3))):
        child = start(folder, out, resume=segment > 0)
        target = len(seen) + int(rng.integers(0, 4))  # 0: a kill before any new snapshot

        def ready(target: int = target, child: subprocess.Popen = child) -> bool:
            return len(committed(out)) >= target or child.poll() is not None

        assert poll_until(ready), f"trial {trial}: no snapshot was committed"
        time.sleep(float(rng.uniform(0.0, 0.3 if target else 2.5)))
        sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
        if child.poll() is None:
            child.send_signal(sig)
        code = wait(child)
        stderr = child.stderr.read()
        assert "Traceback" not in stderr, f"trial {trial}: {stderr}"
        assert code in (0, -signal.SIGKILL, 130, 143), f"trial {trial}: exit {code}: {stderr}"
        seen.update(committed(out))
    child = start(folder, out, resume=True)
    code = wait(child)
    assert code == 0, f"trial {trial}: the final resume failed: {child.stderr.read()}"
    after = committed(out)
    for name, digest in seen.items():
        assert after.get(name) == digest, f"trial {trial}: committed {name} lost or rewritten"
    steps, values = series(out)
    assert steps == reference_steps
    assert set(values) == set(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(values[name], array, err_msg=f"trial {trial}: {name}")
