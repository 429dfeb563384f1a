"""The run store: a SIGKILLed writer leaves every committed snapshot readable, bad files are
reported (never dropped), and resume repairs what a killed writer left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from curvscope.linalg import SpectralDensity
from curvscope.tracking import RunStore, load_run
from curvscope.tracking.store import DAMAGED_PREFIX, INDEX_FILE, TMP_PREFIX

# The child and the checks build the same density from the step, so a loaded snapshot can be
# compared with what was meant to be written, bit for bit.
DENSITY_CODE = """
def make_density(step):
    rng = np.random.default_rng(step)
    nodes = np.sort(rng.standard_normal((4, 40)), axis=1)
    weights = rng.random((4, 40))
    weights /= weights.sum(axis=1, keepdims=True)
    return SpectralDensity(nodes, weights, np.full(4, 40), 1000, {"seed": step})
"""


def make_density(step: int) -> SpectralDensity:
    namespace = {"np": np, "SpectralDensity": SpectralDensity}
    exec(DENSITY_CODE, namespace)  # the very code the child runs
    return namespace["make_density"](step)


CHILD = (
    textwrap.dedent(
        """
    import sys, time
    import numpy as np
    from curvscope.linalg import SpectralDensity
    import curvscope.tracking.store as store_module
    from curvscope.tracking import RunStore
    """
    )
    + DENSITY_CODE
    + textwrap.dedent(
        """
    run_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "slow":
        # From the third snapshot on, linger just before the commit rename (after the manifest
        # is written), so the parent can kill the writer while a complete-looking temporary
        # folder exists, however slow the machine.
        fsync_dir, calls = store_module._fsync_dir, []

        def slow(path):
            fsync_dir(path)
            if path.name.startswith(store_module.TMP_PREFIX):
                calls.append(path)
                if len(calls) > 2:
                    time.sleep(30)

        store_module._fsync_dir = slow
    store = RunStore(run_dir, config={"writer": "kill test"}, resume=True)
    step = max(store.completed_steps, default=-1) + 1
    while True:
        rng = np.random.default_rng(10_000 + step)
        payload = {"payload": rng.standard_normal(60_000)}  # ~0.5 MB, so writes take a while
        scalars = {"value": float(make_density(step).nodes.sum()), "half": step / 2}
        store.write_snapshot(step, scalars, {"density": make_density(step), "payload": payload})
        step += 1
    """
    )
)


def committed(run_dir: Path) -> int:
    folder = run_dir / "snapshots"
    return sum(1 for e in folder.iterdir() if e.name.startswith("step_")) if folder.exists() else 0


def run_and_kill(script: Path, run_dir: Path, delay: float, mode: str = "fast") -> None:
    """Start the writer, wait until it committed 2 more snapshots, wait ``delay``, SIGKILL."""
    before = committed(run_dir)
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), mode])
    try:
        deadline = time.monotonic() + 60
        while committed(run_dir) < before + 2:
            assert child.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.002)
        if mode == "slow":  # wait for a temporary folder whose manifest is already written
            snapshots = run_dir / "snapshots"
            while not any(
                (e / "manifest.json").exists()
                for e in snapshots.iterdir()
                if e.name.startswith(TMP_PREFIX)
            ):
                assert time.monotonic() < deadline
                time.sleep(0.002)
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def check_every_step_readable(run_dir: Path):
    run = load_run(run_dir, check_hashes=True, warn=False)
    steps = run.steps.tolist()
    assert steps == list(range(len(steps))), "a committed step is missing from the series"
    for i, step in enumerate(steps):
        expected = make_density(step)
        density = run.densities[step]
        np.testing.assert_array_equal(density.nodes, expected.nodes)
        np.testing.assert_array_equal(density.weights, expected.weights)
        assert run.scalars["value"][i] == float(expected.nodes.sum())
        arrays, _ = run.results("payload")[step]
        assert arrays["payload"].shape == (60_000,)
    for problem in run.problems:  # only what a kill may leave; never a damaged snapshot
        assert "temporary folder" in problem.reason or "missing from" in problem.reason, problem
    return run


def test_sigkilled_writer_leaves_every_committed_snapshot_readable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    # Three kills, resuming each time: two at different moments of the write loop, and one
    # that lands for certain inside a snapshot write, between its manifest and its rename.
    for delay in (0.0, 0.013):
        run_and_kill(script, run_dir, delay)
        check_every_step_readable(run_dir)
    run_and_kill(script, run_dir, 0.05, mode="slow")
    run = check_every_step_readable(run_dir)
    leftovers = [p for p in run.problems if "temporary folder" in p.reason]
    assert leftovers, "the slow kill should leave a temporary folder"
    assert all(TMP_PREFIX in p.path for p in leftovers)
    assert len(run) >= 6

    # A torn last index line (half a line, no newline) is reported, and reading goes on.
    index = run_dir / INDEX_FILE
    lines_before = index.read_bytes().count(b"\n")
    with open(index, "ab") as handle:
        handle.write(b'{"step": 99999, "value": 1.2')
    with pytest.warns(UserWarning, match="problem"):
        torn = load_run(run_dir)
    assert torn.steps.tolist() == run.steps.tolist()
    torn_problems = [p for p in torn.problems if p.path.endswith(f":{lines_before + 1}")]
    assert len(torn_problems) == 1 and "torn last line" in torn_problems[0].reason

    # Resume: the temporary folder is reported and removed, the torn line is ended by a
    # newline (kept, so it stays reported), and new lines are whole again.
    with RunStore(run_dir, config={"writer": "kill test"}, resume=True) as store:
        assert any("never completed" in p.reason for p in store.problems)
        assert any("torn" in p.reason for p in store.problems)
        assert store.completed_steps == set(run.steps.tolist())
        nxt = max(store.completed_steps) + 1
        store.write_snapshot(
            nxt,
            {"value": float(make_density(nxt).nodes.sum())},
            {
                "density": make_density(nxt),
                "payload": {"payload": np.zeros(60_000)},
            },
        )
    assert not [e for e in (run_dir / "snapshots").iterdir() if e.name.startswith(TMP_PREFIX)]
    after = load_run(run_dir, warn=False)
    assert after.steps.tolist() == [*run.steps.tolist(), nxt]
    assert [p.reason.split(":")[0] for p in after.problems] == [
        "invalid line (a torn line ended by a resume, or damage)"
    ]
    np.testing.assert_array_equal(after.densities[nxt].nodes, make_density(nxt).nodes)


def write_steps(store: RunStore, steps) -> None:
    for step in steps:
        store.write_snapshot(step, {"value": step * 0.5}, {"density": make_density(step)})


def test_bad_files_are_reported_and_left_out_never_dropped_silently(tmp_path):
    run_dir = tmp_path / "run"
    with RunStore(run_dir, config={"a": 1}) as store:
        write_steps(store, range(4))
    # Damage step 1 (truncated file), drop step 3's index line, add a stray file.
    density = run_dir / "snapshots" / "step_00000001" / "density.npz"
    density.write_bytes(density.read_bytes()[:-10])
    index = run_dir / INDEX_FILE
    index.write_bytes(b"".join(index.read_bytes().splitlines(keepends=True)[:3]))
    (run_dir / "snapshots" / "notes.txt").write_text("hello")

    with pytest.warns(UserWarning, match="4 problem"):
        run = load_run(run_dir)
    assert run.steps.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(run.scalars["value"], [0.0, 1.0, 1.5])
    reasons = {Path(p.path.split(":")[0]).name: p.reason for p in run.problems}
    assert "density.npz has" in reasons["step_00000001"] and "left out" in reasons["step_00000001"]
    assert "no readable snapshot folder" in reasons[INDEX_FILE]
    assert "missing from" in reasons["step_00000003"]
    assert "unexpected" in reasons["notes.txt"]

    # A corruption that keeps the size is found by the hashes (checked by default).
    scalars = run_dir / "snapshots" / "step_00000002" / "density.json"
    text = scalars.read_text()
    scalars.write_text(text.replace('"seed": 2', '"seed": 7'))
    assert 2 in load_run(run_dir, check_hashes=False, warn=False).steps
    assert 2 not in load_run(run_dir, warn=False).steps

    # Resume moves the damaged snapshots aside (the truncated one and the one corrupted in
    # place), re-appends the missing index line, and the damaged steps can be written again.
    with RunStore(run_dir, config={"a": 1}, resume=True) as store:
        assert store.completed_steps == {0, 3}
        write_steps(store, [1, 2])
    run = load_run(run_dir, warn=False)
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert sum(DAMAGED_PREFIX in p.path for p in run.problems) == 2
    assert not any("missing from" in p.reason for p in run.problems)


def test_store_refuses_what_would_mix_runs(tmp_path):
    run_dir = tmp_path / "run"
    store = RunStore(run_dir, config={"lr": 0.1, "schedule": "every:5"})
    write_steps(store, [0])
    with pytest.raises(ValueError, match="append-only"):
        write_steps(store, [0])
    with pytest.raises(RuntimeError, match="another writer"):
        RunStore(run_dir, config={"lr": 0.1, "schedule": "every:5"}, resume=True)
    with pytest.raises(ValueError, match="'step' is set by the store"):
        store.write_snapshot(5, {"step": 5})
    with pytest.raises(TypeError, match="must be numbers"):
        store.write_snapshot(5, {"name": "abc"})
    store.close()
    with pytest.raises(FileExistsError, match="resume=True"):
        RunStore(run_dir, config={"lr": 0.1})
    with pytest.raises(ValueError, match=r"lr: stored 0\.1, now 0\.2"):
        RunStore(run_dir, config={"lr": 0.2, "schedule": "every:5"}, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        RunStore(tmp_path / "other")
    with RunStore(run_dir, resume=True) as again:  # config None accepts the stored one
        assert again.config == {"lr": 0.1, "schedule": "every:5"}
        assert again.completed_steps == {0}
        assert again.problems == []


def test_run_series_table_and_missing_values(tmp_path):
    run_dir = tmp_path / "run"
    with RunStore(run_dir, config={}) as store:
        store.write_snapshot(10, {"a": 1.0, "b": np.float32(2.0)})
        store.write_snapshot(20, {"a": 3, "c": None})
        store.write_snapshot(5, {"b": float("inf")})
    run = load_run(run_dir)
    assert run.problems == []
    assert run.steps.dtype == np.int64 and run.steps.tolist() == [5, 10, 20]
    np.testing.assert_array_equal(run.scalars["a"], [np.nan, 1.0, 3.0])
    np.testing.assert_array_equal(run.scalars["b"], [np.inf, 2.0, np.nan])
    np.testing.assert_array_equal(run.scalars["c"], [np.nan, np.nan, np.nan])
    table = run.table()
    assert [row["step"] for row in table] == [5, 10, 20]
    assert set(table[0]) == {"step", "a", "b", "c"}
    assert len(run.densities) == 0
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pip install pandas"):
            run.to_pandas()
    else:
        assert list(run.to_pandas().columns) == ["step", "a", "b", "c"]
    index_rows = [json.loads(line) for line in (run_dir / INDEX_FILE).read_text().splitlines()]
    assert [row["step"] for row in index_rows] == [10, 20, 5]
    with pytest.raises(FileNotFoundError, match="not a curvscope run folder"):
        load_run(tmp_path)
    assert os.path.exists(run_dir / "run.json")


def test_a_run_without_committed_snapshots_is_replaced_by_a_new_run(tmp_path):
    """run.json, an empty index and a killed writer's temporary folder hold no data: a new run
    replaces them (and says so); any committed snapshot, or another file, still refuses."""
    run_dir = tmp_path / "run"
    RunStore(run_dir, config={"lr": 0.1}).close()
    leftover = run_dir / "snapshots" / f"{TMP_PREFIX}step_00000000-123-abcd"
    leftover.mkdir()
    (leftover / "scalars.json").write_text("{")
    (run_dir / INDEX_FILE).touch()
    with RunStore(run_dir, config={"lr": 0.2}) as store:
        assert [Path(p.path).name for p in store.problems] == ["run.json"]
        assert "never committed a snapshot" in store.problems[0].reason
        assert store.config == {"lr": 0.2} and store.completed_steps == set()
        assert list((run_dir / "snapshots").iterdir()) == []
        write_steps(store, [0])
    run = load_run(run_dir)
    assert run.config == {"lr": 0.2} and run.steps.tolist() == [0] and run.problems == []
    with pytest.raises(FileExistsError, match="resume=True"):
        RunStore(run_dir, config={"lr": 0.2})

    other = tmp_path / "other"
    RunStore(other, config={}).close()
    (other / "notes.txt").write_text("mine")  # not the store's: never deleted
    with pytest.raises(FileExistsError, match="resume=True"):
        RunStore(other, config={})
    assert (other / "notes.txt").exists()
    holder = RunStore(tmp_path / "held", config={})  # an open writer keeps its folder
    with pytest.raises(RuntimeError, match="another writer"):
        RunStore(tmp_path / "held", config={})
    holder.close()
    assert (tmp_path / "held" / "run.json").exists()


def test_snapshot_notes_round_trip(tmp_path):
    with RunStore(tmp_path / "run", config={}) as store:
        store.write_snapshot(0, {"a": 1.0}, notes={"m": {"status": "skipped", "reason": "why"}})
        store.write_snapshot(1, {"a": 2.0})
    run = load_run(tmp_path / "run")
    assert run.notes == {0: {"m": {"status": "skipped", "reason": "why"}}}
