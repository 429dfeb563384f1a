"""Lanczos tridiagonalisation with full reorthogonalization, many start vectors in lockstep.

All recurrences run in float64 whatever the operator's dtype. Each step applies the operator
once to the block of all still-active start vectors (one data pass for all probes), then
orthogonalises every new vector against its own probe's whole basis, as Ghorbani et al. 2019
do: classical Gram-Schmidt, repeated when the DGKS test (ARPACK's rule) says the first pass
removed a large share of the vector ("twice is enough", Giraud et al. 2005).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import resources
from ..results import _atomic_write
from .basis import DiskBasis, MemoryBasis
from .interface import LinearOperatorLike, apply_rows, as_operator, gaussian_rows

BasisKind = Literal["memory", "disk"]


@dataclass
class LanczosResult:
    """Tridiagonal matrices of k Lanczos runs.

    Attributes:
        alphas: Diagonals, shape (k, m); entries past ``num_steps[p]`` are 0.
        betas: Off-diagonals, shape (k, m); ``betas[p, j]`` couples steps j and j+1 and
            ``betas[p, num_steps[p] - 1]`` is the norm of the last residual.
        num_steps: Steps taken per probe, shape (k,); fewer than m after a breakdown
            (the Krylov space became invariant).
        start_norms: Norms of the (unnormalised) start vectors, shape (k,).
        basis: The Lanczos vectors when ``keep_basis`` was set (``vectors(p, stop)``).
    """

    alphas: np.ndarray
    betas: np.ndarray
    num_steps: np.ndarray
    start_norms: np.ndarray
    basis: MemoryBasis | DiskBasis | None = field(default=None, repr=False)

    def tridiagonal(self, probe: int) -> tuple[np.ndarray, np.ndarray]:
        """(diagonal (m_p,), off-diagonal (m_p - 1,)) of probe ``probe``'s T."""
        steps = int(self.num_steps[probe])
        return self.alphas[probe, :steps].copy(), self.betas[probe, : steps - 1].copy()


#: Second reorthogonalization pass when a pass shrinks w below this share of its norm.
DGKS_ETA = 1 / np.sqrt(2)

#: The checkpoint's basis: the (m, k, n) float64 array's bytes.
CHECKPOINT_BASIS = "basis.f64"
#: The checkpoint's recurrence state and metadata: one JSON file, replaced atomically.
CHECKPOINT_STATE = "state.json"
#: The arrays of a checkpoint of the first format (its state.json held the metadata only).
LEGACY_STATE_ARRAYS = "state.npz"
#: Format of :data:`CHECKPOINT_STATE` this version writes (1: metadata only, arrays in
#: :data:`LEGACY_STATE_ARRAYS`; still read).
STATE_FORMAT = 2
#: A resume recomputes the first step's alpha and beta and accepts differences up to this
#: many epsilons of the operator's dtype times max(|alpha|, beta): other BLAS kernels (another
#: CPU or thread count) round differently, another operator differs by far more.
PRODUCT_CHECK_EPS = 1e3


def lanczos(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    num_iters: int,
    start: torch.Tensor | None = None,
    num_probes: int = 1,
    seed: int = 0,
    basis: BasisKind = "memory",
    basis_dir: str | os.PathLike[str] | None = None,
    keep_basis: bool = False,
    breakdown_tol: float | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> LanczosResult:
    """Run Lanczos from k start vectors at once, with full reorthogonalization.

    Args:
        op: Symmetric operator of shape (n, n) with ``matmat``, or a dense matrix.
        num_iters: Steps m per start vector; capped at n.
        start: Start vectors as columns (n, k); default ``num_probes`` Gaussian vectors
            drawn from ``seed``. They are normalised here.
        num_probes: k when ``start`` is not given.
        seed: Seed of the default start vectors.
        basis: "memory" (a float64 (m, k, n) tensor) or "disk" (a float64 file in
            ``basis_dir``, so RAM holds only a few n-vectors per probe). A memory basis larger
            than the memory available on the device (:func:`curvscope.resources.
            available_memory`) is refused up front with a MemoryError (not when that cannot
            be read).
        basis_dir: Folder of the disk basis; the system's temporary folder by default. The
            file has no name there (it is unlinked as soon as it is open), so a killed run
            leaves nothing behind; with ``keep_basis`` it is named and left in place.
        keep_basis: Return the basis in the result (for Ritz vectors); otherwise it is freed.
        breakdown_tol: A probe stops when its residual norm falls below this times the
            largest |alpha| or beta seen (its Krylov space is then invariant to working
            accuracy). Default: sqrt(machine epsilon) of the operator's dtype.
        progress: Show a progress bar over steps.
        checkpoint_dir: Keep the run resumable in this folder: the basis lives on disk there
            (``basis.f64``, the (m, k, n) float64 array's bytes) and the small recurrence state
            (``state.json``: step, finished, n, identity and the (k, m) alphas and betas, per
            probe num_steps, active flags, scales, last betas and start-vector norms, floats
            written exactly) is committed as one file, replaced atomically (temporary file,
            fsync, rename), before every operator product and after the basis rows it refers
            to are fsynced. A run killed at any moment loses at most the product in flight.
            A folder that already holds a checkpoint is refused (FileExistsError) unless
            ``resume`` is set: nothing is overwritten silently.
        resume: Continue from the state in ``checkpoint_dir`` (a fresh start when it holds
            none). The same operator, m and start vectors are required, and checked before
            anything is written: the start vectors' norms and directions, ``identity``, and
            one product of the operator with the start vectors, whose alpha and beta must
            reproduce the checkpoint's first step (to within ``PRODUCT_CHECK_EPS`` epsilons
            of the operator's dtype), also for a finished checkpoint. A state that is not
            complete and self-consistent (shapes, dtypes, step and per-probe counts, finite
            values) is refused with a ValueError naming the file and the field; a refused
            resume leaves the checkpoint byte for byte as it was. Checkpoints of the first
            format (``state.json`` with the metadata and ``state.npz`` with the arrays) are
            read when they pass the same checks (a pair torn by a kill between its two writes
            does not) and rewritten in the current format. The saved recurrence and basis are
            restored exactly, and every step after the resume runs the same arithmetic on the
            same memory layouts as an uninterrupted run (rows kept contiguous, basis chunks
            read into torch's 64-byte-aligned memory): the result equals the uninterrupted
            run's bit for bit when the operator's products are a function of their inputs'
            values (curvscope's operators and ``DenseOperator`` are, on one machine with one
            thread count). A resume on another CPU or with another thread count runs other
            BLAS kernels, which round differently: the numbers then agree to rounding
            (tests/linalg/test_resume.py).
        stop: Optional ``stop(alphas, betas, num_steps) -> bool`` called after every step
            with the (k, m) recurrence arrays so far (read-only views); True ends the run
            there (an early exit, e.g. once the wanted Ritz values have converged).
        identity: Optional JSON-able description of what is measured (e.g. the model, data
            and loss specifications, the operator's kind, a hash of the parameters), stored
            in the checkpoint. A resume whose ``identity`` differs from the stored one is
            refused with a ValueError listing the differing keys; the check is skipped when
            either is None. Compared after a JSON round trip (tuples equal lists).

    Returns:
        :class:`LanczosResult` with per-probe tridiagonals.
    """
    op = as_operator(op)
    n = op.shape[0]
    if num_iters < 1:
        raise ValueError(f"num_iters must be at least 1, got {num_iters}")
    m = min(int(num_iters), n)
    device = op.device
    if start is None:
        if num_probes < 1:
            raise ValueError(f"num_probes must be at least 1, got {num_probes}")
        q = gaussian_rows(num_probes, n, seed, device)
    else:
        if start.ndim == 1:
            start = start.unsqueeze(1)
        if start.shape[0] != n:
            raise ValueError(f"start vectors must have shape (n={n}, k), got {tuple(start.shape)}")
        q = start.T.to(device=device, dtype=torch.float64).clone()
    k = q.shape[0]
    start_norms = q.norm(dim=1)
    if not torch.all(start_norms > 0):
        raise ValueError("a start vector is zero")
    q = q / start_norms[:, None]
    tol = breakdown_tol if breakdown_tol is not None else float(np.sqrt(torch.finfo(op.dtype).eps))
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the interrupted run")

    described = _jsonable_identity(identity)

    state = _State.fresh(k, m, start_norms.cpu().numpy(), described)
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        # Everything about the saved run is checked before anything is written to its folder.
        if not resume:
            _refuse_existing_checkpoint(folder)
        saved = _State.load(folder, n, k, m) if resume else None
        if saved is not None:
            saved.check_start(start_norms.cpu().numpy())
            saved.check_identity(described, folder)
        store: MemoryBasis | DiskBasis = DiskBasis(
            m, k, n, device, keep=True, path=folder / CHECKPOINT_BASIS, reopen=saved is not None
        )  # kept on close: the checkpoint owns it
        if saved is not None:
            if saved.step > 0 or saved.finished:  # products were taken: were they this op's?
                try:
                    _check_first_step(op, store, q, saved, folder)
                except BaseException:
                    store.close()
                    raise
            state = saved
            if state.identity is None:
                state.identity = described
    elif basis == "memory":
        check_basis_memory(
            m * k * n * 8, device, f"the memory basis ({m} steps x {k} probes x n = {n:,})"
        )
        store = MemoryBasis(m, k, n, device)
    elif basis == "disk":
        store = DiskBasis(m, k, n, device, directory=basis_dir, keep=keep_basis)
    else:
        raise ValueError(f"basis must be 'memory' or 'disk', not {basis!r}")

    active = torch.as_tensor(np.flatnonzero(state.active), device=device)
    beta_prev = torch.as_tensor(state.beta_prev, device=device)
    q_prev = torch.zeros_like(q)
    if state.step > 0 and not state.finished:  # resuming: current and previous vectors
        q = store.vectors_at(state.step).to(device)
        q_prev = store.vectors_at(state.step - 1).to(device)
    try:
        for step in tqdm(
            range(state.step, m),
            desc="lanczos",
            disable=not progress,
            leave=False,
            initial=state.step,
            total=m,
        ):
            if state.finished:
                break
            store.write(step, q)
            if checkpoint_dir is not None:
                state.step = step
                state.beta_prev = beta_prev.cpu().numpy()
                store.flush()
                state.save(Path(checkpoint_dir), n)
            idx = active
            everyone = idx.numel() == k  # no breakdown yet: use the blocks without copies
            current = q if everyone else q[idx]
            previous = q_prev if everyone else q_prev[idx]
            alpha, beta, w = _step(op, store, step, idx, current, previous, beta_prev[idx])
            ids = idx.cpu().numpy()
            state.alphas[ids, step] = alpha.cpu().numpy()
            state.betas[ids, step] = beta.cpu().numpy()
            state.num_steps[ids] += 1
            state.scale[ids] = np.maximum(
                state.scale[ids],
                np.maximum(np.abs(state.alphas[ids, step]), state.betas[ids, step]),
            )
            if step == m - 1:
                break
            alive = beta.cpu().numpy() > tol * np.maximum(
                state.scale[ids], np.finfo(np.float64).tiny
            )
            state.active[ids[~alive]] = False
            if not alive.any() or (
                stop is not None and stop(state.alphas, state.betas, state.num_steps)
            ):
                state.finished = True
                break
            beta_prev[idx] = beta
            if everyone and alive.all():
                q_prev, q = q, w.div_(beta[:, None])
                continue
            keep = torch.as_tensor(alive, device=device)
            q_prev[idx] = q[idx]
            new_q = q.clone()
            new_q[idx[keep]] = w[keep] / beta[keep, None]
            q = new_q
            active = idx[keep]
    except BaseException:
        store.close()  # a checkpoint's basis is kept (keep=True): only the file is closed
        raise
    if checkpoint_dir is not None:
        state.step = m
        state.finished = True
        state.save(Path(checkpoint_dir), n)
    kept = store if keep_basis else None
    if not keep_basis:
        store.close()
    return LanczosResult(state.alphas, state.betas, state.num_steps, state.start_norms, kept)


def _step(
    op: LinearOperatorLike,
    store: MemoryBasis | DiskBasis,
    step: int,
    idx: torch.Tensor,
    current: torch.Tensor,
    previous: torch.Tensor,
    beta_prev: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lanczos step of the probes ``idx`` (a of them).

    One product, then the three-term recurrence and the full reorthogonalization against the basis
    rows [0, step].

    Args:
        op: The operator.
        store: The basis; rows [0, step] of the probes ``idx`` are read.
        step: j, the index of ``current`` in the basis.
        idx: Indices of the probes that take this step, shape (a,).
        current: The probes' current vectors q_j, rows (a, n); already in ``store`` at ``step``.
        previous: Their previous vectors q_{j-1}, rows (a, n) (zeros at step 0).
        beta_prev: Their previous betas, shape (a,) (zeros at step 0).

    Returns:
        (alpha (a,), beta (a,), the residual w (a, n), orthogonal to the basis, norm beta).
    """
    w = apply_rows(op, current)
    # In place, without (k, n) temporaries: at large n these passes are memory-bound.
    alpha = torch.linalg.vecdot(w, current, dim=1)
    w.addcmul_(current, alpha[:, None], value=-1.0)
    w.addcmul_(previous, beta_prev[:, None], value=-1.0)
    # Full reorthogonalization against the probe's whole basis. A second pass runs when the
    # first removed a large share of w (the DGKS test ARPACK uses: ||w_after|| <
    # ||w_before|| / sqrt(2)); "twice is enough" then holds, and when the first pass removed
    # only rounding-level components the second is skipped.
    norm_before = w.norm(dim=1)
    for _ in range(2):
        for _, chunk in store.read_chunks(step + 1, idx):
            for p in range(chunk.shape[1]):  # one probe's rows (s, n), a strided view
                rows = chunk[:, p]
                w[p].addmv_(rows.T, torch.mv(rows, w[p]), alpha=-1.0)
        del chunk, rows  # do not hold a pass's last chunk while the next pass reads
        beta = torch.linalg.vector_norm(w, dim=1)
        if not bool((beta < DGKS_ETA * norm_before).any()):
            break
        norm_before = beta
    return alpha, beta, w


def _check_first_step(
    op: LinearOperatorLike, store: DiskBasis, q: torch.Tensor, saved: _State, folder: Path
) -> None:
    """Refuse to resume ``saved`` with another operator or other start vectors.

    The start vectors' norms were compared already; here their directions are compared with
    the basis' first rows, and the first step is recomputed (one product of all k normalised
    start vectors ``q``, rows (k, n), with the same arithmetic as the run) and its alpha and
    beta compared with the stored ones, per probe, to within :data:`PRODUCT_CHECK_EPS`
    epsilons of the operator's dtype times max(|alpha|, beta).
    """
    k = q.shape[0]
    first = store.vectors_at(0).to(q.device)
    if not bool(((first - q).abs() <= 1e-12).all()):
        raise ValueError(
            f"the start vectors differ from the checkpointed run's in {folder} (their norms "
            "agree, their directions do not): resume with the same start vectors, or start a "
            "new run in a new or empty checkpoint folder"
        )
    zeros = torch.zeros_like(q)
    idx = torch.arange(k, device=q.device)
    alpha, beta, _ = _step(
        op, store, 0, idx, q, zeros, torch.zeros(k, dtype=q.dtype, device=q.device)
    )
    now_alpha, now_beta = alpha.cpu().numpy(), beta.cpu().numpy()
    stored_alpha, stored_beta = saved.alphas[:, 0], saved.betas[:, 0]
    scale = np.maximum(np.maximum(np.abs(stored_alpha), stored_beta), np.finfo(np.float64).tiny)
    tol = PRODUCT_CHECK_EPS * torch.finfo(op.dtype).eps * scale
    agree = (np.abs(now_alpha - stored_alpha) <= tol) & (np.abs(now_beta - stored_beta) <= tol)
    if not agree.all():  # NaN agrees with nothing
        p = int(np.flatnonzero(~agree)[0])
        raise ValueError(
            f"the operator differs from the checkpointed run's in {folder} (model, data, loss "
            f"or parameters changed?): its first product gives alpha = {now_alpha[p]:.17g}, "
            f"beta = {now_beta[p]:.17g} for probe {p}, the checkpoint holds "
            f"{stored_alpha[p]:.17g} and {stored_beta[p]:.17g} (tolerance {tol[p]:.3g}). "
            "Resume with the operator of the interrupted run, or start a new run in a new or "
            "empty checkpoint folder"
        )


def check_basis_memory(needed: int, device: torch.device, what: str) -> None:
    """Raise MemoryError when ``needed`` bytes exceed the memory available on ``device`` now.

    ``what`` names them (float64) in the message; nothing happens where the memory cannot be read.
    """
    available = resources.available_memory(device)
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} needs {needed:,} bytes of float64 but {available:,} bytes are available "
            f'on {device}: pass basis="disk" (CLI: --basis disk) to keep the Lanczos basis in '
            "a file read back in chunks, or use fewer steps or probes"
        )


def _refuse_existing_checkpoint(folder: Path) -> None:
    found = [name for name in (CHECKPOINT_STATE, LEGACY_STATE_ARRAYS) if (folder / name).exists()]
    if found:
        raise FileExistsError(
            f"{folder} already holds a Lanczos checkpoint ({', '.join(found)}) that a new run "
            "would overwrite: pass resume=True (CLI: --resume) to continue it, or choose a new "
            "or empty checkpoint folder"
        )


def _jsonable_identity(identity: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``identity`` after a JSON round trip (what a checkpoint stores and compares)."""
    if identity is None:
        return None
    if not isinstance(identity, Mapping):
        raise TypeError(
            f"identity must be a mapping of JSON-able values (str, numbers, bools, None, "
            f"lists, dicts) or None, not {type(identity).__name__}"
        )

    def convert(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        raise TypeError(
            f"identity holds a {type(value).__name__} ({value!r}), which is not JSON-able: "
            "describe it with str, numbers, bools, None, lists or dicts"
        )

    return json.loads(json.dumps(dict(identity), sort_keys=True, default=convert))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_ARRAYS = ("alphas", "betas", "num_steps", "scale", "active", "beta_prev", "start_norms")


@dataclass
class _State:
    """The recurrence state of a lockstep Lanczos run, small enough to rewrite every step.

    ``step`` is the step whose product comes next (its vector is in the basis at row
    ``step``); ``num_steps[p]`` equals ``step`` for the probes still active, and the state of
    a finished run has ``step = m``.
    """

    step: int
    finished: bool
    alphas: np.ndarray
    betas: np.ndarray
    num_steps: np.ndarray
    scale: np.ndarray
    active: np.ndarray
    beta_prev: np.ndarray
    start_norms: np.ndarray
    identity: dict[str, Any] | None = None

    @classmethod
    def fresh(
        cls, k: int, m: int, start_norms: np.ndarray, identity: dict[str, Any] | None = None
    ) -> _State:
        return cls(
            step=0,
            finished=False,
            alphas=np.zeros((k, m)),
            betas=np.zeros((k, m)),
            num_steps=np.zeros(k, dtype=np.int64),
            scale=np.zeros(k),
            active=np.ones(k, dtype=bool),
            beta_prev=np.zeros(k),
            start_norms=start_norms,
            identity=identity,
        )

    def save(self, folder: Path, n: int) -> None:
        """Commit the state as one file, atomically (floats round-trip exactly in JSON)."""
        data = {
            "kind": "LanczosState",
            "format": STATE_FORMAT,
            "n": n,
            "step": int(self.step),
            "finished": bool(self.finished),
            "identity": self.identity,
            **{name: getattr(self, name).tolist() for name in _ARRAYS},
        }
        text = json.dumps(data)
        _atomic_write(folder / CHECKPOINT_STATE, lambda handle: handle.write(text.encode()))
        # A first-format checkpoint, resumed: its arrays file is superseded now.
        (folder / LEGACY_STATE_ARRAYS).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, n: int, k: int, m: int) -> _State | None:
        """The saved state, validated in full, or None when the folder holds none yet.

        None means a fresh start. Reads nothing but the state; writes nothing.
        """
        file = folder / CHECKPOINT_STATE
        if not file.exists():
            return None
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise _damaged(str(file), "the file", f"is not readable JSON ({error})") from None
        if not isinstance(data, dict) or data.get("kind") != "LanczosState":
            raise _damaged(str(file), "kind", "is not 'LanczosState'")
        source = str(file)
        if "format" not in data:  # the first format: metadata here, arrays in state.npz
            arrays_file = folder / LEGACY_STATE_ARRAYS
            source = f"{file} with {arrays_file}"
            try:
                with np.load(arrays_file, allow_pickle=False) as npz:
                    arrays = {key: npz[key] for key in npz.files}
            except FileNotFoundError:
                raise _damaged(source, LEGACY_STATE_ARRAYS, "is missing") from None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise _damaged(source, LEGACY_STATE_ARRAYS, f"is not readable ({error})") from None
            data = {**arrays, **data, "identity": None}
        elif data["format"] != STATE_FORMAT:
            raise ValueError(
                f"{file} is a checkpoint state of format {data['format']!r}; this curvscope "
                f"reads formats 1 and {STATE_FORMAT}: resume with the curvscope that wrote it, "
                "or start a new run in a new or empty checkpoint folder"
            )
        return cls._validated(data, source, folder, n, k, m)

    @classmethod
    def _validated(
        cls, data: dict[str, Any], source: str, folder: Path, n: int, k: int, m: int
    ) -> _State:
        """The state in ``data`` after checking that it is complete and self-consistent."""
        for name in ("n", "step", "finished", *_ARRAYS):
            if name not in data:
                raise _damaged(source, name, "is missing")
        saved_n, step, finished = data["n"], data["step"], data["finished"]
        for name, value in (("n", saved_n), ("step", step)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise _damaged(source, name, f"is {value!r}, not an integer")
        if not isinstance(finished, bool):
            raise _damaged(source, "finished", f"is {finished!r}, not true or false")
        arrays = {name: _array(data[name], name, source) for name in _ARRAYS}
        alphas, betas = arrays["alphas"], arrays["betas"]
        if alphas.ndim != 2:
            raise _damaged(source, "alphas", f"has shape {alphas.shape}, not (probes, steps)")
        saved_k, saved_m = alphas.shape
        if betas.shape != alphas.shape:
            raise _damaged(
                source, "alphas/betas", f"have shapes {alphas.shape} and {betas.shape}, not one"
            )
        for name, array in arrays.items():
            if name not in ("alphas", "betas") and array.shape != (saved_k,):
                raise _damaged(
                    source, name, f"has shape {array.shape}, not ({saved_k},) (one per probe)"
                )
        if saved_n != n or (saved_k, saved_m) != (k, m):
            raise ValueError(
                f"the checkpoint in {folder} is of another run (n={saved_n}, probes x steps="
                f"{(saved_k, saved_m)}; now n={n}, {(k, m)}): use a new checkpoint folder or "
                "the original settings"
            )
        for name in ("alphas", "betas", "scale", "beta_prev", "start_norms"):
            if not np.isfinite(arrays[name]).all():
                raise _damaged(source, name, "holds values that are not finite")
        num_steps, active = arrays["num_steps"], arrays["active"]
        if not 0 <= step <= m:
            raise _damaged(source, "step", f"is {step}, outside [0, {m}]")
        if finished != (step == m):
            raise _damaged(source, "finished", f"is {finished} at step {step} of {m}")
        if finished:
            if not ((num_steps >= 1) & (num_steps <= m)).all():
                raise _damaged(source, "num_steps", f"is {num_steps}, outside [1, {m}]")
        else:
            if step == 0 and not active.all():
                raise _damaged(source, "active", "has a stopped probe before the first step")
            if not active.any():
                raise _damaged(source, "active", "has no running probe in an unfinished run")
            if not ((num_steps[active] == step).all() and (num_steps[~active] <= step).all()):
                raise _damaged(
                    source,
                    "num_steps",
                    f"is {num_steps} at step {step} (active: {active}): the running probes "
                    "must have taken exactly step steps, the others at most that (a torn write?)",
                )
            if (num_steps < 0).any():
                raise _damaged(source, "num_steps", f"is {num_steps}, negative")
        taken = np.arange(m)[None, :] < num_steps[:, None]
        for name in ("alphas", "betas"):
            if (arrays[name][~taken] != 0).any():
                raise _damaged(
                    source, name, "holds values past a probe's num_steps (a torn write?)"
                )
        if (betas < 0).any():
            raise _damaged(source, "betas", "holds negative norms")
        scale = np.where(taken, np.maximum(np.abs(alphas), betas), 0.0).max(axis=1)
        if not np.array_equal(arrays["scale"], scale):
            raise _damaged(source, "scale", "is not the largest |alpha| or beta of each probe")
        if not finished and step > 0:
            last = betas[active, step - 1]
            if not np.array_equal(arrays["beta_prev"][active], last):
                raise _damaged(source, "beta_prev", "is not the running probes' last beta")
        if not (arrays["start_norms"] > 0).all():
            raise _damaged(source, "start_norms", "holds a norm that is not positive")
        identity = data.get("identity")
        if identity is not None and not isinstance(identity, dict):
            raise _damaged(source, "identity", f"is {identity!r}, not an object or null")
        return cls(step=int(step), finished=finished, identity=identity, **arrays)

    def check_start(self, start_norms: np.ndarray) -> None:
        if not np.array_equal(start_norms, self.start_norms):
            raise ValueError(
                "the start vectors differ from the checkpointed run's (another seed or "
                "operator size?): resume with the same seed and probes"
            )

    def check_identity(self, identity: dict[str, Any] | None, folder: Path) -> None:
        """Refuse when both the stored and the given identity are known and differ."""
        if self.identity is None or identity is None:
            return
        missing = object()
        differences = []
        for key in sorted(set(self.identity) | set(identity)):
            stored, now = self.identity.get(key, missing), identity.get(key, missing)
            if stored is missing or now is missing or _canonical(stored) != _canonical(now):
                shown_stored = "(absent)" if stored is missing else _canonical(stored)
                shown_now = "(absent)" if now is missing else _canonical(now)
                differences.append(f"{key}: stored {shown_stored}, now {shown_now}")
        if differences:
            raise ValueError(
                f"the checkpoint in {folder} measured something else: "
                + "; ".join(differences)
                + ". Resume with the interrupted run's settings, or start a new run in a new or "
                "empty checkpoint folder"
            )


def _array(value: Any, name: str, source: str) -> np.ndarray:
    """A state array with the dtype its field needs: float64, int64 (num_steps), bool (active)."""
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged lists
        raise _damaged(source, name, f"is not an array ({error})") from None
    kinds = {"num_steps": "iu", "active": "b"}.get(name, "fiu")
    if array.dtype.kind not in kinds:
        raise _damaged(source, name, f"has dtype {array.dtype}, not {_KIND_NAMES[kinds]}")
    target = {"num_steps": np.int64, "active": np.bool_}.get(name, np.float64)
    return array.astype(target)


_KIND_NAMES = {"iu": "integers", "b": "booleans", "fiu": "numbers"}


def _damaged(source: str, field_name: str, what: str) -> ValueError:
    return ValueError(
        f"the checkpoint state {source} is damaged or inconsistent: {field_name} {what}. It was "
        "left as it is; it cannot be resumed: start the run again in a new or empty "
        "checkpoint folder"
    )
