"""``curvscope`` under faults: kills and signals, refused resumes, user files and user errors.

* ``track`` killed (SIGKILL, SIGINT, SIGTERM) right after its first snapshot is committed
  resumes to the series of an uninterrupted run.
* A checkpointed ``density`` refuses to resume with another model, loss or weights.
* A ``path/to/file.py`` named by several options runs once.
* User errors exit with status 2 and one line.
* Ctrl-C and SIGTERM at any point (mid-run, after the result is written, in a finalizer, at
  interpreter exit) end with one line and status 130 or 143, never a traceback.

The signal scenarios run as real subprocesses, all launched at once by one module fixture
(about 15 s on 2 busy CPUs, most of it importing torch), each told when to send its signal by
a file the run writes; each test then checks one scenario.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from curvscope import SpectralDensity
from curvscope.cli import is_user_error, main
from curvscope.results import load_result
from curvscope.tracking import load_run

QUIET = ["--no-progress", "--threads", "1"]

FAULT_MODULE = textwrap.dedent(
    """
    import atexit
    import os
    import time
    from pathlib import Path

    import torch
    from torch import nn
    from torch.nn import functional as F

    from curvscope import zoo
    from curvscope.losses import mse_loss

    CALLS = 0


    def build():
        torch.manual_seed(int(os.environ.get("FAULT_SEED", "1")))
        return nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 1))


    def build2():
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 1))


    def batches():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(20, 3, generator=g)
        y = torch.randn(20, 1, generator=g)
        return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 20, 8)]


    class Slow:
        def __del__(self):
            Path(os.environ["FAULT_MARK"]).write_text("finalizer")
            time.sleep(4)


    def _call():
        # Counts calls; Ctrl-C from inside after FAULT_STOP_AFTER calls; paced by FAULT_SLEEP,
        # each call appended to FAULT_PROGRESS; at call 10 a finalizer that sleeps.
        global CALLS
        CALLS += 1
        if "FAULT_STOP_AFTER" in os.environ and CALLS > int(os.environ["FAULT_STOP_AFTER"]):
            raise KeyboardInterrupt
        if "FAULT_PROGRESS" in os.environ:
            with open(os.environ["FAULT_PROGRESS"], "a") as handle:
                handle.write(".")
        time.sleep(float(os.environ.get("FAULT_SLEEP", "0")))
        if os.environ.get("FAULT_AT") == "finalizer" and CALLS == 10:
            Slow()  # collected at once: its __del__ runs here


    def loss(outputs, targets):
        _call()
        return F.mse_loss(outputs, targets)


    def track_model():
        return zoo.digits_mlp(hidden=(8,), seed=0)


    def track_data():
        return zoo.digits_subset(num_samples=120, batch_size=60)


    def track_loss(outputs, targets):
        _call()
        return mse_loss(outputs, targets)


    def __getattr__(name):
        if name == "lazy":  # an attribute whose lazy loading fails
            raise RuntimeError("optional dependency missing")
        raise AttributeError(name)


    def _at_exit():
        Path(os.environ["FAULT_MARK"]).write_text("exit")
        time.sleep(4)


    if "FAULT_ATEXIT_RAN" in os.environ:
        atexit.register(lambda: Path(os.environ["FAULT_ATEXIT_RAN"]).write_text("ran"))
    if os.environ.get("FAULT_AT") == "exit":
        atexit.register(_at_exit)
    """
)

DENSITY = ["density", "--model", "faultmod:build", "--data", "faultmod:batches"]
DENSITY += ["--loss", "faultmod:loss", "--keep-graphs", "none"]

# Track: heavy ball on minibatches of 30 (the series depends on the momentum buffers and on
# the samples drawn), snapshots at 0, 10, 20, 30.
TRACK = ["track", "--model", "faultmod:track_model", "--data", "faultmod:track_data"]
TRACK += ["--loss", "faultmod:track_loss", "--optimizer", "momentum", "--lr", "0.3"]
TRACK += ["--momentum", "0.8", "--batch-size", "30", "--schedule", "every:10"]
TRACK += ["--measure", "top,stability,trace", "--trace-probes", "12", "--steps", "30"]
TRACK_STEPS = [0, 10, 20, 30]


def write_module(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "faultmod.py"
    path.write_text(FAULT_MODULE)
    return path


@pytest.fixture
def fault_module(tmp_path, monkeypatch):
    """``faultmod`` importable, fresh for each test (its call counter starts at 0)."""
    folder = tmp_path / "pkg"
    write_module(folder)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("FAULT_STOP_AFTER", "FAULT_SEED", "FAULT_PROGRESS", "FAULT_SLEEP", "FAULT_AT"):
        monkeypatch.delenv(name, raising=False)
    sys.modules.pop("faultmod", None)
    yield folder
    sys.modules.pop("faultmod", None)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, *QUIET])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def series(folder: Path) -> dict[str, np.ndarray]:
    run_ = load_run(folder)
    assert run_.steps.tolist() == TRACK_STEPS
    return {
        name: values
        for name, values in run_.scalars.items()
        if not name.startswith("time_") and name != "unix_time"
    }


# --------------------------------------------------------------------------- subprocesses


@dataclass
class Scenario:
    """A ``python -m curvscope`` run that gets ``signum`` once ``ready()`` holds."""

    args: list[str]
    signum: int
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    out: Path | None = None
    process: subprocess.Popen | None = None
    signalled: bool = False
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def _marked(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and path.read_text() == text


def _track_scenario(root: Path, name: str, signum: int) -> Scenario:
    out = root / name
    first = out / "snapshots"
    return Scenario(
        [*TRACK, "--out", str(out), *QUIET],
        signum,
        lambda: any(first.glob("step_*/manifest.json")),
        env={"FAULT_SLEEP": "0.02"},  # about 1 s of training after the first snapshot
        out=out,
    )


def _density_scenario(root: Path, name: str, signum: int, at: str) -> Scenario:
    out = root / name
    mark = root / f"{name}.mark"
    progress = root / f"{name}.progress"
    env = {
        "FAULT_MARK": str(mark),
        "FAULT_PROGRESS": str(progress),
        "FAULT_ATEXIT_RAN": str(root / f"{name}.atexit"),
        "TMPDIR": str(root / f"{name}.tmp"),
    }
    (root / f"{name}.tmp").mkdir()
    args = [*DENSITY, "--iters", "30", "--probes", "2", "--basis", "disk", "--out", str(out)]
    if at == "run":  # 3 loss calls per product, 20 ms each: signalled about 1.5 s before the end
        env["FAULT_SLEEP"] = "0.02"
        ready = lambda: progress.exists() and progress.stat().st_size >= 15  # noqa: E731
    elif at == "result":  # in the plotting, the final lines or (a slow machine) at exit
        env["FAULT_AT"] = "exit"
        ready = (out / "density.json").exists
    else:  # "finalizer" (mid-run, at the 10th loss call) or "exit" (an atexit callback)
        env["FAULT_AT"] = at
        ready = _marked(mark, at)
    return Scenario([*args, *QUIET], signum, ready, env=env, out=out)


SCENARIOS = {
    "track-SIGKILL": ("track", signal.SIGKILL, None),
    "track-SIGINT": ("track", signal.SIGINT, None),
    "track-SIGTERM": ("track", signal.SIGTERM, None),
    "density-SIGINT-run": ("density", signal.SIGINT, "run"),
    "density-SIGTERM-run": ("density", signal.SIGTERM, "run"),
    "density-SIGINT-result": ("density", signal.SIGINT, "result"),
    "density-SIGINT-finalizer": ("density", signal.SIGINT, "finalizer"),
    "density-SIGINT-exit": ("density", signal.SIGINT, "exit"),
    "density-SIGTERM-exit": ("density", signal.SIGTERM, "exit"),
}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> tuple[Path, dict[str, Scenario]]:
    """Every scenario of :data:`SCENARIOS`, run at once; each gets its signal when ready."""
    root = tmp_path_factory.mktemp("faults")
    write_module(root)
    scenarios = {}
    for name, (command, signum, at) in SCENARIOS.items():
        if command == "track":
            scenarios[name] = _track_scenario(root, name, signum)
        else:
            scenarios[name] = _density_scenario(root, name, signum, at)
    for scenario in scenarios.values():
        scenario.process = subprocess.Popen(
            [sys.executable, "-m", "curvscope", *scenario.args],
            cwd=root,
            env={**os.environ, **scenario.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.monotonic() + 240
    try:
        waiting = set(scenarios)
        while waiting and time.monotonic() < deadline:
            for name in sorted(waiting):
                scenario = scenarios[name]
                if scenario.process.poll() is not None:
                    waiting.discard(name)  # ended before its signal: the test says so
                elif scenario.ready():
                    scenario.process.send_signal(scenario.signum)
                    scenario.signalled = True
                    waiting.discard(name)
            time.sleep(0.002)
        for scenario in scenarios.values():
            scenario.stdout, scenario.stderr = scenario.process.communicate(
                timeout=max(1.0, deadline - time.monotonic())
            )
            scenario.returncode = scenario.process.returncode
    finally:
        for scenario in scenarios.values():
            if scenario.process.poll() is None:
                scenario.process.kill()
                scenario.process.communicate()
    return root, scenarios


def _status(signum: int) -> int:
    return -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum


def _line(signum: int) -> str:
    return (
        "curvscope: interrupted" if signum == signal.SIGINT else "curvscope: terminated (SIGTERM)"
    )


@pytest.fixture(scope="module")
def uninterrupted_track(signalled, tmp_path_factory):
    """The track run of the scenarios, in-process and uninterrupted."""
    root, _ = signalled
    sys.path.insert(0, str(root))
    sys.modules.pop("faultmod", None)
    folder = tmp_path_factory.mktemp("track") / "run"
    try:
        assert main([*TRACK, "--out", str(folder), *QUIET]) == 0
        yield root, series(folder)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("faultmod", None)


@pytest.mark.parametrize("name", ["track-SIGKILL", "track-SIGINT", "track-SIGTERM"])
def test_track_killed_after_its_first_snapshot_resumes(signalled, uninterrupted_track, name):
    _, scenarios = signalled
    scenario = scenarios[name]
    assert scenario.signalled, f"the run ended before its first snapshot: {scenario.stderr}"
    assert scenario.returncode == _status(scenario.signum), scenario.stderr
    if scenario.signum != signal.SIGKILL:
        assert scenario.stderr.strip() == _line(scenario.signum)
    committed = load_run(scenario.out, warn=False).steps.tolist()
    assert 0 in committed and len(committed) < len(TRACK_STEPS), "not killed mid-run"

    sys.path.insert(0, str(uninterrupted_track[0]))
    try:
        # Resume with no settings but the folder and the steps: the stored ones are used.
        args = ["track", "--resume", "--steps", "30", "--out", str(scenario.out), *QUIET]
        assert main(args) == 0
    finally:
        sys.path.remove(str(uninterrupted_track[0]))
    resumed, expected = series(scenario.out), uninterrupted_track[1]
    assert set(resumed) == set(expected)
    for key in expected:  # bit for bit on one machine and thread count; rounding allowed
        np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-12, atol=0, err_msg=key)


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name.startswith("density-")])
def test_a_signal_at_any_point_ends_with_one_line_and_its_status(signalled, name):
    root, scenarios = signalled
    scenario = scenarios[name]
    _, signum, at = SCENARIOS[name]
    assert scenario.signalled, f"the run ended before its signal: {scenario.stderr}"
    assert scenario.returncode == _status(signum), scenario.stderr
    assert scenario.stderr.strip() == _line(signum)  # no traceback, no "Exception ignored"
    assert not list((root / f"{name}.tmp").iterdir()), "temporary files left behind"
    written = (scenario.out / "density.npz").exists()
    if at == "run":
        assert not written
        # An orderly shutdown: finally blocks and atexit callbacks ran.
        assert (root / f"{name}.atexit").read_text() == "ran"
    else:  # written before the signal, or (finalizer) the run finished after it: kept
        assert written and SpectralDensity.load(scenario.out / "density").num_probes == 2
    if at == "finalizer":  # the interrupt a finalizer swallowed still ends the command
        assert "wrote" in scenario.stdout


# --------------------------------------------------------------------------- refused resume


@pytest.mark.parametrize(
    "change, env, named",
    [
        (["--model", "faultmod:build2"], {}, "model"),
        (["--loss", "mse"], {}, "loss"),
        ([], {"FAULT_SEED": "3"}, "parameters_sha256"),  # same spec, other weights
    ],
)
def test_density_resume_refuses_another_problem(
    fault_module, tmp_path, monkeypatch, capsys, change, env, named
):
    out = tmp_path / "run"
    args = [*DENSITY, "--iters", "8", "--probes", "2", "--out", str(out)]
    monkeypatch.setenv("FAULT_STOP_AFTER", "12")  # Ctrl-C in the 4th product
    code, _, err = run(capsys, *args, "--checkpoint")
    assert code == 130 and err.strip() == "curvscope: interrupted"
    monkeypatch.delenv("FAULT_STOP_AFTER")

    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        code, out_text, err = run(capsys, *args, *change, "--resume")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvscope: error: "), err
    assert named in lines[0]
    assert not (out / "density.npz").exists() and "wrote" not in out_text

    # The run itself resumes, to the numbers of an uninterrupted checkpointed run.
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0, err
    resumed = SpectralDensity.load(out / "density")
    code, _, err = run(capsys, *args[:-1], str(tmp_path / "whole"), "--checkpoint")
    assert code == 0, err
    whole = SpectralDensity.load(tmp_path / "whole" / "density")
    np.testing.assert_allclose(resumed.nodes, whole.nodes, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- user files

COUNTED = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    from torch import nn

    _count = Path(__file__).with_suffix(".count")
    _count.write_text((_count.read_text() if _count.exists() else "") + "x")
    SHARED = []


    def build():
        SHARED.append("model")
        torch.manual_seed(0)
        return nn.Linear(3, 1)


    def batches():
        SHARED.append("data")
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))]
    """
)


@pytest.mark.parametrize(
    "model, data",
    [
        ("{path}:build", "{path}:batches"),
        ("{path}:build", "counted:batches"),
        ("counted:build", "{path}:batches"),
    ],
    ids=["file-file", "file-module", "module-file"],
)
def test_a_file_named_twice_runs_once(tmp_path, monkeypatch, capsys, model, data):
    path = tmp_path / "counted.py"
    path.write_text(COUNTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("counted", None)
    try:
        model, data = model.format(path=path), data.format(path=path)
        args = ["density", "--model", model, "--data", data, "--loss", "mse"]
        code, _, err = run(capsys, *args, "--iters", "2", "--probes", "1", "--out", str(tmp_path))
        assert code == 0, err
        assert path.with_suffix(".count").read_text() == "x"  # executed once
    finally:
        sys.modules.pop("counted", None)


# --------------------------------------------------------------------------- user errors


def _density_folder(tmp_path: Path) -> Path:
    (tmp_path / "dens").mkdir()
    (tmp_path / "dens" / "density.json").write_text("{}")
    return tmp_path / "dens"


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("a file")
    return tmp_path / "notes.txt"


def _checkpointed(tmp_path: Path, monkeypatch, capsys, interrupted: bool = True) -> Path:
    """OUT of a density run checkpointed with faultmod, stopped by Ctrl-C mid-run."""
    out = tmp_path / "ckpt"
    args = [*DENSITY, "--iters", "6", "--probes", "2", "--out", str(out), "--checkpoint"]
    if interrupted:
        monkeypatch.setenv("FAULT_STOP_AFTER", "9")
    run(capsys, *args)
    monkeypatch.delenv("FAULT_STOP_AFTER", raising=False)
    return out


def _garbage_state(tmp_path, monkeypatch, capsys) -> Path:
    out = _checkpointed(tmp_path, monkeypatch, capsys)
    (out / "checkpoint" / "state.json").write_text("{not json")
    return out


def _no_basis(tmp_path, monkeypatch, capsys) -> Path:
    out = _checkpointed(tmp_path, monkeypatch, capsys)
    for file in (out / "checkpoint").iterdir():
        if not file.name.startswith("state"):
            file.unlink()
    return out


def _short_basis(tmp_path, monkeypatch, capsys) -> Path:
    out = _checkpointed(tmp_path, monkeypatch, capsys)
    for file in (out / "checkpoint").iterdir():
        if not file.name.startswith("state"):
            os.truncate(file, 100)
    return out


def _no_state_arrays(tmp_path, monkeypatch, capsys) -> Path:
    out = _checkpointed(tmp_path, monkeypatch, capsys)
    for file in (out / "checkpoint").glob("state*.npz"):
        file.unlink()
    (out / "checkpoint" / "state.json").write_text('{"kind": "LanczosState", "step": 1}')
    return out


TINY = ["--iters", "6", "--probes", "2"]
USER_ERROR_CASES = {
    "track --resume of a density folder": (
        lambda t, m, c: ["track", "--resume", "--out", str(_density_folder(t))],
        "holds files but no run",
    ),
    "track into a density folder": (
        lambda t, m, c: ["track", "--out", str(_density_folder(t))],
        "holds files but no run",
    ),
    "density --out under a file": (
        lambda t, m, c: [*DENSITY, *TINY, "--out", str(_a_file(t) / "run")],
        "under a file",
    ),
    "track --out under a file": (
        lambda t, m, c: ["track", "--out", str(_a_file(t) / "run")],
        "under a file",
    ),
    "density --out a file": (
        lambda t, m, c: [*DENSITY, *TINY, "--out", str(_a_file(t))],
        "is a file",
    ),
    "missing model file": (
        lambda t, m, c: ["density", "--model", str(t / "nothere.py") + ":build"],
        "there is no file",
    ),
    "attribute that does not exist": (
        lambda t, m, c: ["density", "--model", "faultmod:nothing"],
        "has no attribute 'nothing'",
    ),
    "attribute that fails to load": (
        lambda t, m, c: ["density", "--model", "faultmod:lazy"],
        "optional dependency missing",
    ),
    "checkpoint overwritten without --resume": (
        lambda t, m, c: [
            *DENSITY,
            *TINY,
            "--checkpoint",
            "--out",
            str(_checkpointed(t, m, c, interrupted=False)),
        ],
        "--resume",
    ),
    "corrupted checkpoint state": (
        lambda t, m, c: [*DENSITY, *TINY, "--resume", "--out", str(_garbage_state(t, m, c))],
        "state",
    ),
    "checkpoint without its basis": (
        lambda t, m, c: [*DENSITY, *TINY, "--resume", "--out", str(_no_basis(t, m, c))],
        "checkpoint",
    ),
    "checkpoint with a truncated basis": (
        lambda t, m, c: [*DENSITY, *TINY, "--resume", "--out", str(_short_basis(t, m, c))],
        "basis",
    ),
    "checkpoint with a damaged state": (
        lambda t, m, c: [*DENSITY, *TINY, "--resume", "--out", str(_no_state_arrays(t, m, c))],
        "state",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERROR_CASES))
def test_user_errors_exit_2_with_one_line(fault_module, tmp_path, monkeypatch, capsys, case):
    make_args, message = USER_ERROR_CASES[case]
    args = make_args(tmp_path, monkeypatch, capsys)
    if args[0] == "track" and "--model" not in args:
        args += ["--model", "faultmod:track_model", "--data", "faultmod:track_data"]
    code, out, err = run(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvscope: error: "), err
    assert message in lines[0]
    assert "Traceback" not in out + err


def test_checks_of_curvscope_are_user_errors_and_system_failures_are_not(tmp_path):
    def raised(action: Callable[[], object]) -> BaseException:
        try:
            action()
        except BaseException as error:
            return error
        raise AssertionError("nothing raised")

    # A missing result file, told by curvscope's loader: the user named the wrong path.
    assert is_user_error(raised(lambda: load_result(tmp_path / "nothing")))
    assert is_user_error(ValueError("bad value"))
    # The same types raised by the system (an errno) or by other code: internal failures.
    assert not is_user_error(raised(lambda: open(tmp_path / "nothing")))  # noqa: SIM115
    assert not is_user_error(raised(lambda: (_ for _ in ()).throw(MemoryError("elsewhere"))))
    assert not is_user_error(MemoryError())
    assert not is_user_error(RuntimeError("internal"))
