"""Lanczos tridiagonalisation with full reorthogonalization, many start vectors in lockstep.

All recurrences run in float64 whatever the operator's dtype. Each step applies the operator
once to the block of all still-active start vectors (one data pass for all probes), then
orthogonalises every new vector against its own probe's whole basis, twice (classical
Gram-Schmidt repeated: "twice is enough", Giraud et al. 2005), as Ghorbani et al. 2019 do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

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
) -> LanczosResult:
    """Run Lanczos from k start vectors at once, with full reorthogonalization (twice).

    Args:
        op: Symmetric operator of shape (n, n) with ``matmat``, or a dense matrix.
        num_iters: Steps m per start vector; capped at n.
        start: Start vectors as columns (n, k); default ``num_probes`` Gaussian vectors
            drawn from ``seed``. They are normalised here.
        num_probes: k when ``start`` is not given.
        seed: Seed of the default start vectors.
        basis: "memory" (a float64 (m, k, n) tensor) or "disk" (a numpy memmap in
            ``basis_dir``, so RAM holds only a few n-vectors per probe).
        basis_dir: Folder of the disk basis; a temporary one by default.
        keep_basis: Return the basis in the result (for Ritz vectors); otherwise it is freed.
        breakdown_tol: A probe stops when its residual norm falls below this times the
            largest |alpha| or beta seen (its Krylov space is then invariant to working
            accuracy). Default: sqrt(machine epsilon) of the operator's dtype.
        progress: Show a progress bar over steps.

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

    if basis == "memory":
        store: MemoryBasis | DiskBasis = MemoryBasis(m, k, n, device)
    elif basis == "disk":
        store = DiskBasis(m, k, n, device, directory=basis_dir, keep=keep_basis)
    else:
        raise ValueError(f"basis must be 'memory' or 'disk', not {basis!r}")

    alphas = np.zeros((k, m))
    betas = np.zeros((k, m))
    num_steps = np.zeros(k, dtype=np.int64)
    scale = np.zeros(k)
    active = torch.arange(k, device=device)
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(k, dtype=torch.float64, device=device)
    try:
        for step in tqdm(range(m), desc="lanczos", disable=not progress, leave=False):
            store.write(step, q)
            idx = active
            w = apply_rows(op, q[idx])
            alpha = (w * q[idx]).sum(dim=1)
            w -= alpha[:, None] * q[idx] + beta_prev[idx, None] * q_prev[idx]
            for _ in range(2):  # full reorthogonalization, twice
                for _, chunk in store.read_chunks(step + 1, idx):
                    coeffs = torch.einsum("skn,kn->sk", chunk, w)
                    w -= torch.einsum("sk,skn->kn", coeffs, chunk)
            beta = w.norm(dim=1)
            ids = idx.cpu().numpy()
            alphas[ids, step] = alpha.cpu().numpy()
            betas[ids, step] = beta.cpu().numpy()
            num_steps[ids] += 1
            scale[ids] = np.maximum(
                scale[ids], np.maximum(np.abs(alphas[ids, step]), betas[ids, step])
            )
            if step == m - 1:
                break
            alive = beta.cpu().numpy() > tol * np.maximum(scale[ids], np.finfo(np.float64).tiny)
            if not alive.any():
                break
            keep = torch.as_tensor(alive, device=device)
            q_prev[idx] = q[idx]
            beta_prev[idx] = beta
            new_q = q.clone()
            new_q[idx[keep]] = w[keep] / beta[keep, None]
            q = new_q
            active = idx[keep]
    except BaseException:
        store.close()
        raise
    if not keep_basis:
        store.close()
        kept = None
    else:
        kept = store
    return LanczosResult(alphas, betas, num_steps, start_norms.cpu().numpy(), kept)
