"""Lanczos tridiagonalisation with full reorthogonalization, many start vectors in lockstep.

All recurrences run in float64 whatever the operator's dtype. Each step applies the operator
once to the block of all still-active start vectors (one data pass for all probes), then
orthogonalises every new vector against its own probe's whole basis, as Ghorbani et al. 2019
do: classical Gram-Schmidt, repeated when the DGKS test (ARPACK's rule) says the first pass
removed a large share of the vector ("twice is enough", Giraud et al. 2005).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..results import load_result, save_result
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

CHECKPOINT_BASIS = "basis.f64"
CHECKPOINT_STATE = "state"


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
            ``basis_dir``, so RAM holds only a few n-vectors per probe).
        basis_dir: Folder of the disk basis; a temporary one by default.
        keep_basis: Return the basis in the result (for Ritz vectors); otherwise it is freed.
        breakdown_tol: A probe stops when its residual norm falls below this times the
            largest |alpha| or beta seen (its Krylov space is then invariant to working
            accuracy). Default: sqrt(machine epsilon) of the operator's dtype.
        progress: Show a progress bar over steps.
        checkpoint_dir: Keep the run resumable: the basis lives on disk in this folder
            (``basis.f64``) and the small recurrence state (``state.npz``/``state.json``) is
            replaced atomically before every operator product, after the basis rows it
            refers to are flushed. A run killed at any moment loses at most the product in
            flight.
        resume: Continue from the state in ``checkpoint_dir`` (the same operator, m and
            start vectors are required; the start vectors' norms are compared). The saved
            recurrence and basis are restored exactly, and every step after the resume runs
            the same arithmetic on the same memory layouts as an uninterrupted run (rows kept
            contiguous, basis chunks read into torch's 64-byte-aligned memory): the result
            equals the uninterrupted run's bit for bit when the operator's products are a
            function of their inputs' values (curvscope's operators and ``DenseOperator``
            are, on one machine with one thread count). A resume on another CPU or with
            another thread count runs other BLAS kernels, which round differently: the
            numbers then agree to rounding (tests/linalg/test_resume.py).
        stop: Optional ``stop(alphas, betas, num_steps) -> bool`` called after every step
            with the (k, m) recurrence arrays so far (read-only views); True ends the run
            there (an early exit, e.g. once the wanted Ritz values have converged).

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

    state = _State.fresh(k, m, start_norms.cpu().numpy())
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        saved = _State.load(folder, n, k, m) if resume else None
        store: MemoryBasis | DiskBasis = DiskBasis(
            m, k, n, device, keep=True, path=folder / CHECKPOINT_BASIS, reopen=saved is not None
        )  # kept on close: the checkpoint owns it
        if saved is not None:
            state = saved
            state.check_start(start_norms.cpu().numpy())
    elif basis == "memory":
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
            w = apply_rows(op, current)
            # In place, without (k, n) temporaries: at large n these passes are memory-bound.
            alpha = torch.linalg.vecdot(w, current, dim=1)
            w.addcmul_(current, alpha[:, None], value=-1.0)
            w.addcmul_(previous, beta_prev[idx, None], value=-1.0)
            # Full reorthogonalization against the probe's whole basis. A second pass runs
            # when the first removed a large share of w (the DGKS test ARPACK uses:
            # ||w_after|| < ||w_before|| / sqrt(2)); "twice is enough" then holds, and when
            # the first pass removed only rounding-level components the second is skipped.
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


@dataclass
class _State:
    """The recurrence state of a lockstep Lanczos run, small enough to rewrite every step."""

    step: int
    finished: bool
    alphas: np.ndarray
    betas: np.ndarray
    num_steps: np.ndarray
    scale: np.ndarray
    active: np.ndarray
    beta_prev: np.ndarray
    start_norms: np.ndarray

    @classmethod
    def fresh(cls, k: int, m: int, start_norms: np.ndarray) -> _State:
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
        )

    def save(self, folder: Path, n: int) -> None:
        arrays = {
            name: getattr(self, name)
            for name in (
                "alphas",
                "betas",
                "num_steps",
                "scale",
                "active",
                "beta_prev",
                "start_norms",
            )
        }
        meta = {"step": self.step, "finished": self.finished, "n": n, "kind": "LanczosState"}
        save_result(folder / CHECKPOINT_STATE, arrays, meta)

    @classmethod
    def load(cls, folder: Path, n: int, k: int, m: int) -> _State | None:
        """The saved state, or None when the folder holds none yet (a fresh start)."""
        if not (folder / f"{CHECKPOINT_STATE}.json").exists():
            return None
        arrays, meta = load_result(folder / CHECKPOINT_STATE)
        if meta.get("n") != n or arrays["alphas"].shape != (k, m):
            raise ValueError(
                f"the checkpoint in {folder} is of another run (n={meta.get('n')}, "
                f"probes x steps={arrays['alphas'].shape}; now n={n}, {(k, m)}): use a new "
                "checkpoint folder or the original settings"
            )
        return cls(step=int(meta["step"]), finished=bool(meta["finished"]), **arrays)

    def check_start(self, start_norms: np.ndarray) -> None:
        if not np.array_equal(start_norms, self.start_norms):
            raise ValueError(
                "the start vectors differ from the checkpointed run's (another seed or "
                "operator size?): resume with the same seed and probes"
            )
