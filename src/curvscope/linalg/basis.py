"""Where a Lanczos basis lives: in memory, or on disk (numpy memmap) for models whose
m x n basis does not fit in RAM. Both store float64 rows of shape (k, n) per step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class MemoryBasis:
    """Basis of shape (m, k, n) held as one float64 tensor on the operator's device."""

    def __init__(self, num_steps: int, k: int, n: int, device: torch.device) -> None:
        self.data = torch.empty(num_steps, k, n, dtype=torch.float64, device=device)

    def write(self, step: int, rows: torch.Tensor) -> None:
        self.data[step].copy_(rows)

    def read_chunks(self, stop: int, probes: torch.Tensor):
        """Yield (0, rows): steps [0, stop) of ``probes`` as one (stop, k, n) chunk."""
        yield 0, self.data[:stop, probes]

    def vectors(self, probe: int, stop: int) -> torch.Tensor:
        """Basis of one probe as rows (stop, n)."""
        return self.data[:stop, probe]

    def vectors_at(self, step: int) -> torch.Tensor:
        """All probes' vectors of one step, (k, n)."""
        return self.data[step].clone()

    def close(self) -> None:
        self.data = torch.empty(0)


class DiskBasis:
    """Basis of shape (m, k, n) in a float64 numpy memmap; only a few rows are in RAM at once.

    Args:
        directory: Folder for the memmap file; a temporary folder by default. The file is
            removed by :meth:`close` unless ``keep`` is set.
        keep: Leave the file in place on :meth:`close`.
        chunk_steps: Steps read per chunk during reorthogonalization.
        path: Exact file to use (a checkpoint's basis); overrides ``directory``.
        reopen: Open an existing ``path`` for reading and writing instead of creating it.
    """

    def __init__(
        self,
        num_steps: int,
        k: int,
        n: int,
        device: torch.device,
        directory: str | os.PathLike[str] | None = None,
        keep: bool = False,
        chunk_steps: int = 8,
        path: str | os.PathLike[str] | None = None,
        reopen: bool = False,
    ) -> None:
        self.device = device
        self.keep = keep
        self.chunk_steps = chunk_steps
        self.temporary_dir: Path | None = None
        if path is not None:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            if directory is None:
                self.temporary_dir = Path(tempfile.mkdtemp(prefix="curvscope_basis_"))
            folder = Path(directory) if directory is not None else self.temporary_dir
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"lanczos_basis_{os.getpid()}_{id(self)}.f64"
        mode = "r+" if reopen else "w+"
        self.data = np.memmap(self.path, dtype=np.float64, mode=mode, shape=(num_steps, k, n))

    def flush(self) -> None:
        """Push written rows to the file (before a checkpoint refers to them)."""
        self.data.flush()

    def write(self, step: int, rows: torch.Tensor) -> None:
        self.data[step] = rows.detach().cpu().numpy()

    def read_chunks(self, stop: int, probes: torch.Tensor):
        """Yield (start, rows) with rows of shape (chunk, len(probes), n) on the device."""
        index = probes.cpu().numpy()
        for start in range(0, stop, self.chunk_steps):
            block = self.data[start : min(stop, start + self.chunk_steps)][:, index]
            yield start, torch.from_numpy(np.ascontiguousarray(block)).to(self.device)

    def vectors(self, probe: int, stop: int) -> torch.Tensor:
        """Basis of one probe as rows (stop, n)."""
        return torch.from_numpy(np.array(self.data[:stop, probe])).to(self.device)

    def vectors_at(self, step: int) -> torch.Tensor:
        """All probes' vectors of one step, (k, n)."""
        return torch.from_numpy(np.array(self.data[step])).to(self.device)

    def close(self) -> None:
        path = self.path
        del self.data
        if not self.keep:
            path.unlink(missing_ok=True)
            if self.temporary_dir is not None:
                self.temporary_dir.rmdir()
