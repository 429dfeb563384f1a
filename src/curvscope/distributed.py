"""torch.distributed helpers: each rank walks its shard of the data, products are summed.

Under ``torchrun --nproc_per_node=N`` (or any launcher that sets up a process group, e.g.
SLURM's ``srun``; docs/distributed.md), every rank holds the same model, builds
the same operator on its own shard of the data and runs the same numerics: the operator sums
its (k, n) product block and its sample count over ranks with one all-reduce per product
(gloo on CPU, NCCL on GPU), so all ranks see bit-identical products and walk identical
Lanczos recurrences. Only the main rank (0) should write results.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes; 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes results."""
    return rank() == 0


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables derived from SLURM's.

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT, for jobs started by ``srun`` with one task per GPU or
    process and no torchrun.

    Returns {} when WORLD_SIZE is already set (torchrun) or SLURM runs a single task.
    MASTER_ADDR must be exported by the job script (SLURM does not give it directly).
    """
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    if not env.get("MASTER_ADDR"):
        raise RuntimeError(
            "running under srun with several tasks but MASTER_ADDR is not set: add "
            "'export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)' "
            "to the job script (see docs/distributed.md)"
        )
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": env.get("MASTER_PORT", "29500"),
    }


def init_from_environment(backend: str | None = None) -> bool:
    """Join the process group a launcher describes (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    torchrun (and any launcher that sets torch.distributed's variables) works as is; a plain
    ``srun`` with several tasks is read from SLURM's variables (:func:`slurm_environment`).
    Returns True when a group with more than one rank is in use afterwards; does nothing
    outside a launcher (WORLD_SIZE unset or 1).
    """
    if is_distributed():
        return True
    os.environ.update(slurm_environment(dict(os.environ)))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op outside a process group)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_total_(total: torch.Tensor, num_samples: int) -> int:
    """Sum a per-rank total (in place) and its sample count over ranks; returns the count.

    Outside a process group ``total`` is left as it is and ``num_samples`` returned.
    """
    if not is_distributed():
        return num_samples
    count = torch.tensor([float(num_samples)], dtype=total.dtype, device=total.device)
    all_reduce_sum_(total)
    return int(all_reduce_sum_(count).item())


class Shard:
    """Every ``world_size``-th batch of ``data`` starting at ``rank``: a re-iterable view.

    Use it when every rank holds the same list or DataLoader; with a ``DistributedSampler``
    the DataLoader is already a shard and needs no wrapping.
    """

    def __init__(self, data: Iterable[Any], rank_: int | None = None, world: int | None = None):
        self.data = data
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.data):
            if index % self.world == self.rank:
                yield batch
