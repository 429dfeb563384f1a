"""A Lanczos checkpoint can neither be mixed with another run, nor torn, nor overwritten
silently; a memory basis that cannot fit is refused up front; a temporary disk basis leaves
nothing behind when its process is killed."""

from __future__ import annotations

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

import curvscope.resources
from curvscope.linalg import DenseOperator, lanczos, spectral_density

N, M, K = 60, 40, 3


class Killed(BaseException):
    """Stands in for SIGKILL: raised inside the run, caught by nothing on the way out."""


class Dying(DenseOperator):
    """A DenseOperator whose process "dies" at its ``after``-th call of matmat."""

    def __init__(self, matrix: np.ndarray, after: int) -> None:
        super().__init__(matrix)
        self.calls, self.after = 0, after

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.calls == self.after:
            raise Killed
        self.calls += 1
        return super().matmat(V)


def planted(n: int = N, seed: int = 0, top: float = 13.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([rng.normal(0.0, 1.0, n - 2), [top / 2, top]])
    return (Q * values) @ Q.T


def interrupted(folder: Path, A: np.ndarray, after: int, **kwargs) -> None:
    """A checkpointed run of ``A`` killed at its ``after``-th product."""
    with pytest.raises(Killed):
        lanczos(Dying(A, after), M, num_probes=K, seed=3, checkpoint_dir=folder, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def same_result(a, b) -> bool:
    return (
        np.array_equal(a.alphas, b.alphas)
        and np.array_equal(a.betas, b.betas)
        and np.array_equal(a.num_steps, b.num_steps)
    )


# ---------------------------------------------------------------- 1. another operator


def test_resume_with_another_operator_of_the_same_size_is_refused(tmp_path):
    """The red team's case: interrupted on A, resumed on B of the same size and seed. Before,
    the start vectors' norms (a function of the seed) matched and B's products were mixed
    into A's recurrence."""
    A, B = planted(seed=0), planted(seed=1, top=13.5)
    folder = tmp_path / "ckpt"
    interrupted(folder, A, after=30)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="operator differs from the checkpointed run's") as err:
        lanczos(B, M, num_probes=K, seed=3, checkpoint_dir=folder, resume=True)
    assert "parameters changed?" in str(err.value) and "new or empty" in str(err.value)
    assert snapshot(folder) == before  # the refused resume wrote nothing
    # The same operator resumes, bit for bit the uninterrupted checkpointed run.
    resumed = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=folder, resume=True)
    reference = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path / "ref")
    assert same_result(resumed, reference)


def test_finished_checkpoint_is_not_returned_for_another_operator(tmp_path):
    A, B = planted(seed=0), planted(seed=1)
    done = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="operator differs"):
        lanczos(B, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert snapshot(tmp_path) == before
    counted = DenseOperator(A)
    again = lanczos(counted, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert same_result(again, done)
    assert counted.num_products == K  # the check's one product of the k start vectors


def test_start_vectors_with_the_same_norms_but_other_directions_are_refused(tmp_path):
    A = planted()
    start = torch.randn(N, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(Killed):
        lanczos(Dying(A, 5), M, start=start, checkpoint_dir=tmp_path)
    flipped = start.clone()
    flipped[: N // 2] *= -1  # the same squares summed in the same order: the same norms
    with pytest.raises(ValueError, match="their directions do not"):
        lanczos(A, M, start=flipped, checkpoint_dir=tmp_path, resume=True)


def test_identity_is_stored_and_a_different_one_refused(tmp_path):
    A = planted()
    identity = {"model": "zoo:mlp", "loss": "ce", "params_sha256": "ab12", "shape": (3, 4)}
    interrupted(tmp_path, A, after=7, identity=identity)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["identity"] == {**identity, "shape": [3, 4]}
    before = snapshot(tmp_path)
    other = {**identity, "model": "zoo:cnn", "params_sha256": "cd34"}
    del other["loss"]
    with pytest.raises(ValueError, match="measured something else") as err:
        lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True, identity=other)
    message = str(err.value)
    assert 'model: stored "zoo:mlp", now "zoo:cnn"' in message
    assert 'params_sha256: stored "ab12", now "cd34"' in message
    assert 'loss: stored "ce", now (absent)' in message and "shape" not in message
    assert snapshot(tmp_path) == before
    # The same identity (a tuple equals its JSON list), or none given: resumed.
    same = {**identity, "shape": [3, 4]}
    lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True, identity=same)
    lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)


def test_spectral_density_passes_the_identity(tmp_path):
    A = planted()
    spectral_density(A, 10, num_probes=2, checkpoint_dir=tmp_path, identity={"model": "a"})
    with pytest.raises(ValueError, match='model: stored "a", now "b"'):
        spectral_density(
            A, 10, num_probes=2, checkpoint_dir=tmp_path, resume=True, identity={"model": "b"}
        )
    with pytest.raises(TypeError, match="not JSON-able"):
        spectral_density(A, 10, num_probes=2, checkpoint_dir=tmp_path / "x", identity={"f": len})


# ---------------------------------------------------------------- 2. torn or damaged state


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 21, 22])
def test_a_kill_during_any_checkpoint_write_leaves_a_resumable_checkpoint(
    tmp_path, monkeypatch, kill_at
):
    """The process dies at the ``kill_at``-th rename into the checkpoint folder. Before, the
    state was two files renamed one after the other: a kill between them (even ``kill_at``)
    left arrays of one step with the metadata of the step before, which no resume could use
    (and each attempt rewrote it as finished)."""
    A = planted()
    folder = tmp_path / "ckpt"
    replace = os.replace
    renames = []

    def dying_replace(source, target, *args, **kwargs):
        if Path(target).parent == folder:
            renames.append(target)
            if len(renames) == kill_at:
                raise Killed
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=folder)
    monkeypatch.setattr(os, "replace", replace)
    resumed = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=folder, resume=True)
    reference = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path / "ref")
    assert same_result(resumed, reference)
    assert sorted(p.name for p in folder.iterdir()) == ["basis.f64", "state.json"]


def damage_step(state: dict) -> None:
    state["step"] -= 1  # the arrays are one step ahead of the step: a torn state


def damage_nan(state: dict) -> None:
    state["alphas"][0][0] = float("nan")


def damage_active(state: dict) -> None:
    state["active"] = [1] * len(state["active"])


def damage_num_steps(state: dict) -> None:
    state["num_steps"] = [float(s) for s in state["num_steps"]]


def damage_finished(state: dict) -> None:
    state["finished"] = "no"


def damage_missing(state: dict) -> None:
    del state["scale"]


def damage_scale(state: dict) -> None:
    state["scale"][1] *= 2


def damage_beta_prev(state: dict) -> None:
    state["beta_prev"][0] += 1e-3


def damage_shape(state: dict) -> None:
    state["betas"] = [row[:-1] for row in state["betas"]]


def damage_past(state: dict) -> None:
    state["alphas"][2][-1] = 1.0


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (damage_step, "num_steps"),
        (damage_nan, "alphas"),
        (damage_active, "active"),
        (damage_num_steps, "num_steps"),
        (damage_finished, "finished"),
        (damage_missing, "scale"),
        (damage_scale, "scale"),
        (damage_beta_prev, "beta_prev"),
        (damage_shape, "alphas/betas"),
        (damage_past, "alphas"),
        (None, "the file"),
    ],
)
def test_a_damaged_state_is_refused_naming_file_and_field_and_left_as_it_is(
    tmp_path, damage, field
):
    A = planted()
    interrupted(tmp_path, A, after=12)
    file = tmp_path / "state.json"
    if damage is None:  # a truncated file
        file.write_text(file.read_text()[:200])
    else:
        state = json.loads(file.read_text())
        damage(state)
        file.write_text(json.dumps(state))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="damaged or inconsistent") as err:
        lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert str(file) in str(err.value) and f": {field} " in str(err.value)
    assert snapshot(tmp_path) == before


def write_first_format(folder: Path, A: np.ndarray, step: int, meta_step: int) -> None:
    """The pair of files the first checkpoint format wrote (state.npz with the arrays, then
    state.json with the metadata) at ``step``, its metadata from ``meta_step``: a torn pair
    when they differ. The basis is a finished run's (its first rows are the same)."""
    full = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=folder)
    (folder / "state.json").unlink()
    alphas, betas = full.alphas.copy(), full.betas.copy()
    alphas[:, step:] = betas[:, step:] = 0.0
    arrays = {
        "alphas": alphas,
        "betas": betas,
        "num_steps": np.full(K, step, dtype=np.int64),
        "scale": np.maximum(np.abs(alphas), betas).max(axis=1),
        "active": np.ones(K, dtype=bool),
        "beta_prev": betas[:, step - 1],
        "start_norms": full.start_norms,
    }
    np.savez(folder / "state.npz", **arrays)
    meta = {"step": meta_step, "finished": False, "n": N, "kind": "LanczosState"}
    (folder / "state.json").write_text(json.dumps(meta))


def test_a_first_format_checkpoint_resumes_when_consistent(tmp_path):
    A = planted()
    write_first_format(tmp_path, A, step=20, meta_step=20)
    resumed = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)
    reference = lanczos(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path / "ref")
    assert same_result(resumed, reference)
    assert not (tmp_path / "state.npz").exists()  # rewritten in the one-file format
    assert json.loads((tmp_path / "state.json").read_text())["format"] == 2


def test_a_torn_first_format_checkpoint_is_refused_and_left_as_it_is(tmp_path):
    """The red team's torn pair: arrays of step 20, metadata of step 19. Before, the resume
    failed inside eigh_tridiagonal ("d (40) must have one more element than e (40)") after
    rewriting the state as finished, losing every product."""
    A = planted()
    write_first_format(tmp_path, A, step=20, meta_step=19)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="damaged or inconsistent: num_steps"):
        spectral_density(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 3. silent truncation


def test_an_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    A = planted()
    interrupted(tmp_path, A, after=9)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="pass resume=True") as err:
        spectral_density(A, M, num_probes=K, seed=3, checkpoint_dir=tmp_path)
    assert "new or empty" in str(err.value)
    assert snapshot(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    spectral_density(A, 10, num_probes=2, checkpoint_dir=empty)  # an empty folder is fine


# ---------------------------------------------------------------- 4. memory basis too large


def test_a_memory_basis_that_cannot_fit_is_refused_up_front(tmp_path, monkeypatch):
    A = planted()
    one_probe = M * N * 8
    monkeypatch.setattr(curvscope.resources, "available_memory", lambda device: one_probe - 1)
    with pytest.raises(MemoryError, match=r'basis="disk" \(CLI: --basis disk\)') as err:
        lanczos(A, M, num_probes=K)
    assert f"{K * one_probe:,} bytes" in str(err.value)
    assert f"{one_probe - 1:,} bytes are available" in str(err.value)
    with pytest.raises(MemoryError, match="one probe's memory basis"):
        spectral_density(A, M, num_probes=K)
    spectral_density(A, M, num_probes=K, basis="disk", basis_dir=tmp_path)
    # Room for one probe, not for all: the probes run one by one, as before.
    monkeypatch.setattr(curvscope.resources, "available_memory", lambda device: 2 * one_probe)
    spectral_density(A, M, num_probes=K)
    # Memory that cannot be read refuses nothing.
    monkeypatch.setattr(curvscope.resources, "available_memory", lambda device: None)
    lanczos(A, M, num_probes=K)
    spectral_density(A, M, num_probes=K)


# ---------------------------------------------------------------- 5. killed temporary basis

CHILD = """
import sys, time, numpy as np
from pathlib import Path
from curvscope.linalg import DenseOperator, lanczos

marker = Path(sys.argv[1])

class Slow(DenseOperator):
    def matmat(self, V):
        marker.touch()
        time.sleep(0.05)
        return super().matmat(V)

basis_dir = sys.argv[2] if len(sys.argv) > 2 else None
lanczos(Slow(np.diag(np.arange(1.0, 301.0))), 250, num_probes=2, basis="disk", basis_dir=basis_dir)
"""


@pytest.mark.parametrize(
    ("sig", "in_basis_dir"),
    [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGKILL, True)],
)
def test_a_killed_run_leaves_no_temporary_basis(tmp_path, sig, in_basis_dir):
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    marker = tmp_path / "started"
    args = [sys.executable, str(script), str(marker)] + ([str(temp)] if in_basis_dir else [])
    child = subprocess.Popen(args, env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the child ended before its first product"
            assert time.monotonic() < deadline, "the child never started its run"
            time.sleep(0.01)
        time.sleep(0.2)  # a few steps in: the basis holds rows
        child.send_signal(sig)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -sig
    assert [p.name for p in temp.rglob("*")] == []
