"""Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Golub & Meurant 2010)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ..resources import memory_share
from ..results import environment_metadata
from .density import SpectralDensity
from .interface import LinearOperatorLike, as_operator, gaussian_rows
from .lanczos import BasisKind, LanczosResult, check_basis_memory, lanczos

#: Share of the device's available memory the default memory basis of a lockstep group may use.
BASIS_SHARE = 0.25


def gauss_quadrature(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss quadrature of a Lanczos tridiagonal T.

    Args:
        alphas: Diagonal of T, shape (m,).
        betas: Off-diagonal of T, shape (m - 1,).

    Returns:
        (Ritz values (m,), squared first components of T's eigenvectors (m,)); the weights
        sum to 1.
    """
    if alphas.size == 1:
        return alphas.copy(), np.ones(1)
    nodes, vectors = eigh_tridiagonal(alphas, betas)
    return nodes, vectors[0] ** 2


def quadrature_from_lanczos(result: LanczosResult) -> tuple[np.ndarray, np.ndarray]:
    """Per-probe nodes and weights, padded to (k, m) with NaN nodes and 0 weights."""
    k, m = result.alphas.shape
    nodes = np.full((k, m), np.nan)
    weights = np.zeros((k, m))
    for probe in range(k):
        node, weight = gauss_quadrature(*result.tridiagonal(probe))
        nodes[probe, : node.size] = node
        weights[probe, : node.size] = weight
    return nodes, weights


def spectral_density(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    num_iters: int = 90,
    num_probes: int = 10,
    seed: int = 0,
    basis: BasisKind = "memory",
    basis_dir: str | os.PathLike[str] | None = None,
    max_basis_bytes: int | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    identity: Mapping[str, Any] | None = None,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        op: Symmetric operator of shape (n, n) with ``matmat`` (or a dense matrix).
        num_iters: Lanczos steps per probe (m); the quadrature has m nodes per probe
            (fewer after a breakdown). Capped at n.
        num_probes: Independent Gaussian start vectors, advanced in lockstep: one ``matmat``
            of all probes per Lanczos step, i.e. one data pass per step.
        seed: Seed of the start vectors; the same seed gives the same nodes, bit for bit.
        basis: Where the Lanczos vectors live: "memory" or "disk" (a file read back in chunks).
            When even one probe's memory basis (m x n x 8 bytes) exceeds the memory available
            on the operator's device, a MemoryError says so up front (use "disk" then).
        basis_dir: Folder of the disk basis (default: the system's temporary folder; the file
            has no name there, so a killed run leaves nothing behind).
        max_basis_bytes: With the memory basis, probes run in lockstep groups small enough
            that the group's float64 basis (m x group x n x 8 bytes) fits this budget
            (default: a quarter of the memory available on the operator's device, at least
            2 GiB where it cannot be read); the start vectors are drawn up front, so the
            grouping never changes the result.
        progress: Show a progress bar over Lanczos steps.
        checkpoint_dir: Make the run resumable (see :func:`~curvscope.linalg.lanczos.lanczos`):
            all probes run in one lockstep group with their basis on disk in this folder. A
            folder that already holds a checkpoint is refused unless ``resume`` is set.
        resume: Continue the run checkpointed in ``checkpoint_dir``; the result equals an
            uninterrupted checkpointed run's bit for bit when the resumed process computes
            the same products (same machine, thread count and operator), and to rounding
            otherwise. Another operator (checked with one product), other start vectors,
            another ``identity`` or a damaged state is refused before anything is written
            (see :func:`~curvscope.linalg.lanczos.lanczos`).
        identity: Optional JSON-able description of what is measured (model, data and loss
            specifications, operator kind, parameter hash), stored in the checkpoint; a
            resume with a different one is refused, listing the differing keys.

    Returns:
        :class:`SpectralDensity` with ``nodes`` and ``weights`` of shape (num_probes, m).

    Example:
        With as many steps as the dimension, the nodes are the eigenvalues and the weights of
        each probe sum to 1:

        >>> import numpy as np
        >>> from curvscope import spectral_density
        >>> density = spectral_density(np.diag([1.0, 2.0, 3.0]), num_iters=3, num_probes=1)
        >>> density.nodes.round(6).tolist()
        [[1.0, 2.0, 3.0]]
        >>> round(float(density.weights.sum()), 6)
        1.0
    """
    op = as_operator(op)
    n = op.shape[0]
    if num_probes < 1 or num_iters < 1:
        raise ValueError(
            f"num_probes and num_iters must be at least 1, got {num_probes} and {num_iters}"
        )
    m = min(int(num_iters), n)
    started = time.perf_counter()
    start_rows = gaussian_rows(num_probes, n, seed, op.device)
    group = num_probes
    if basis == "memory" and checkpoint_dir is None:
        check_basis_memory(
            m * n * 8, op.device, f"one probe's memory basis ({m} steps x n = {n:,})"
        )
        budget = (
            max_basis_bytes
            if max_basis_bytes is not None
            else memory_share(op.device, BASIS_SHARE, fallback=2 * 1024**3)
        )
        group = int(max(1, min(num_probes, budget // max(1, m * n * 8))))
    all_nodes, all_weights, all_steps = [], [], []
    for first in range(0, num_probes, group):
        result = lanczos(
            op,
            m,
            start=start_rows[first : first + group].T,
            basis=basis,
            basis_dir=basis_dir,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            identity=identity,
        )
        nodes, weights = quadrature_from_lanczos(result)
        all_nodes.append(nodes)
        all_weights.append(weights)
        all_steps.append(result.num_steps)
    meta = {
        **environment_metadata(),
        "method": "slq",
        "num_iters": m,
        "num_probes": num_probes,
        "probes_in_lockstep": group,
        "seed": seed,
        "reorthogonalization": "full, DGKS-repeated",
        "recurrence_dtype": "float64",
        "operator_dtype": str(op.dtype).replace("torch.", ""),
        "operator": type(op).__name__,
        "basis": "disk" if checkpoint_dir is not None else basis,
        "resumed": bool(resume),
        "wall_time_s": time.perf_counter() - started,
    }
    return SpectralDensity(
        np.concatenate(all_nodes), np.concatenate(all_weights), np.concatenate(all_steps), n, meta
    )
