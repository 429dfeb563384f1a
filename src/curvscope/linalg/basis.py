"""Where a Lanczos basis lives: in memory, or in a file.

The file is for models whose m x n basis does not fit in RAM. Both store float64 rows of shape
(k, n) per step, laid out as an (m, k, n) row-major array (the file is exactly that array's
bytes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

#: Bytes of basis read per chunk during reorthogonalization (disk basis, partial probe sets).
CHUNK_BYTES = 256 * 2**20


class MemoryBasis:
    """Basis of shape (m, k, n) held as one float64 tensor on the operator's device."""

    def __init__(self, num_steps: int, k: int, n: int, device: torch.device) -> None:
        self.data = torch.empty(num_steps, k, n, dtype=torch.float64, device=device)
        self.chunk_steps = max(1, CHUNK_BYTES // (k * n * 8))

    def write(self, step: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (k, n) as the basis rows of Lanczos step ``step``."""
        self.data[step].copy_(rows)

    def read_chunks(self, stop: int, probes: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows (chunk, len(probes), n)) over steps [0, stop).

        All probes: one view, no copy. A subset (after a breakdown): bounded copies.
        """
        k = self.data.shape[1]
        probes = probes.to(self.data.device)
        if probes.numel() == k and bool((probes == torch.arange(k, device=probes.device)).all()):
            yield 0, self.data[:stop]
            return
        for start in range(0, stop, self.chunk_steps):
            end = min(stop, start + self.chunk_steps)
            yield start, self.data[start:end].index_select(1, probes)

    def vectors(self, probe: int, stop: int) -> torch.Tensor:
        """Basis of one probe as rows (stop, n)."""
        return self.data[:stop, probe]

    def vectors_at(self, step: int) -> torch.Tensor:
        """All probes' vectors of one step, (k, n)."""
        return self.data[step].clone()

    def close(self) -> None:
        """Release the memory of the basis."""
        self.data = torch.empty(0)


class DiskBasis:
    """Basis of shape (m, k, n) in a float64 file, read back in chunks by positioned I/O.

    Only one reusable chunk buffer (about ``chunk_bytes``) and the rows in use are in RAM:
    no memory map, so pages read back are not kept mapped into the process (with a numpy
    memmap every page read stayed resident, one n-vector per step; docs/memory.md).

    A basis that is not kept has no name on disk: it is created without one (Linux's
    ``O_TMPFILE``) or unlinked right after it is opened, so only the open descriptor refers
    to it and the OS frees it when the process ends, however it ends (SIGTERM, SIGKILL, an
    out-of-memory kill). Only where an open file cannot be unlinked (Windows) is it removed
    by :meth:`close` instead.

    Args:
        directory: Folder for the file; the system's temporary folder by default (a
            ``curvscope_basis_*`` folder in it when the file is kept).
        keep: Give the file a name and leave it in place on :meth:`close` (the caller owns
            it). Without ``keep`` the file is anonymous (see above).
        chunk_bytes: Bytes read per chunk during reorthogonalization (at least one step).
        path: Exact file to use (a checkpoint's basis, always kept); overrides ``directory``.
        reopen: Open an existing ``path`` for reading and writing instead of creating it; its
            size must be that of the (m, k, n) basis.
    """

    def __init__(
        self,
        num_steps: int,
        k: int,
        n: int,
        device: torch.device,
        directory: str | os.PathLike[str] | None = None,
        keep: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        path: str | os.PathLike[str] | None = None,
        reopen: bool = False,
    ) -> None:
        if reopen and path is None:
            raise ValueError("reopen=True needs the path of the basis file to reopen")
        self.device = device
        self.keep = keep or path is not None
        self.shape = (num_steps, k, n)
        self.temporary_dir: Path | None = None
        self._unlink_on_close: Path | None = None
        size = num_steps * k * n * 8
        if path is not None:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if reopen:
                try:
                    self.fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{self.path} does not exist: the checkpoint has lost its basis file; "
                        "start again in a new or empty folder"
                    ) from None
                if os.fstat(self.fd).st_size != size:
                    os.close(self.fd)
                    raise ValueError(
                        f"{self.path} does not hold a basis of shape {self.shape}: it belongs "
                        "to another run or was truncated; start again in a new or empty folder"
                    )
            else:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        elif keep:
            if directory is None:
                self.temporary_dir = Path(tempfile.mkdtemp(prefix="curvscope_basis_"))
                folder = self.temporary_dir
            else:
                folder = Path(directory)
                folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"lanczos_basis_{os.getpid()}_{id(self)}.f64"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        else:
            folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            self.fd, self.path, self._unlink_on_close = _anonymous_file(folder)
        if not reopen:
            os.ftruncate(self.fd, size)
        self.chunk_steps = max(1, min(num_steps, chunk_bytes // (k * n * 8)))
        # torch allocates with a fixed (64-byte) alignment, numpy at the heap's whim: BLAS
        # kernels (MKL) pick code paths by alignment, so the reorthogonalization reads the
        # basis into torch memory to do the same arithmetic in every process (see lanczos).
        self._buffer: torch.Tensor | None = None

    def _offset(self, step: int, probe: int = 0) -> int:
        _, k, n = self.shape
        return (step * k + probe) * n * 8

    def _pwrite(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(array)).cast("B")
        while view:  # one write is capped near 2 GiB on Linux
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def _pread(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while view:
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise EOFError(f"{self.path} is shorter than the basis it should hold")
            view, offset = view[got:], offset + got

    def flush(self) -> None:
        """Make written rows durable before a checkpoint refers to them."""
        os.fsync(self.fd)

    def write(self, step: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (k, n), as float64, as the basis rows of Lanczos step ``step``."""
        self._pwrite(rows.detach().to("cpu", torch.float64).numpy(), self._offset(step))

    def read_chunks(self, stop: int, probes: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows (chunk, len(probes), n)) over steps [0, stop).

        The rows live in one reused buffer: each item is valid until the next is requested.
        """
        _, k, n = self.shape
        index = probes.cpu().numpy()
        if self._buffer is None:
            self._buffer = torch.empty((self.chunk_steps, k, n), dtype=torch.float64)
        every = np.array_equal(index, np.arange(k))
        for start in range(0, stop, self.chunk_steps):
            steps = min(stop, start + self.chunk_steps) - start
            block = self._buffer[:steps, : len(index)]
            if every:
                self._pread(block.numpy(), self._offset(start))  # one contiguous read
            else:
                for s in range(steps):
                    for j, probe in enumerate(index):
                        self._pread(block[s, j].numpy(), self._offset(start + s, int(probe)))
            yield start, block.to(self.device)

    def vectors(self, probe: int, stop: int) -> torch.Tensor:
        """Basis of one probe as rows (stop, n)."""
        out = torch.empty((stop, self.shape[2]), dtype=torch.float64)
        for step in range(stop):
            self._pread(out[step].numpy(), self._offset(step, probe))
        return out.to(self.device)

    def vectors_at(self, step: int) -> torch.Tensor:
        """All probes' vectors of one step, (k, n)."""
        out = torch.empty(self.shape[1:], dtype=torch.float64)
        self._pread(out.numpy(), self._offset(step))
        return out.to(self.device)

    def close(self) -> None:
        """Close the file (an unnamed one disappears with it); idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._buffer = None
        if self._unlink_on_close is not None:
            self._unlink_on_close.unlink(missing_ok=True)
            self._unlink_on_close = None


def _anonymous_file(folder: Path) -> tuple[int, Path, Path | None]:
    """A new read-write file in ``folder`` that has no name.

    Returns (descriptor, path for messages, path still to remove on close or None).

    Linux creates it nameless (``O_TMPFILE``); elsewhere, or on a file system without
    ``O_TMPFILE``, it is created under a unique name and unlinked at once. Where an open file
    cannot be unlinked (Windows), the name stays until :meth:`DiskBasis.close`.
    """
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            fd = os.open(folder, os.O_RDWR | tmpfile | os.O_EXCL, 0o600)
        except OSError:  # e.g. a file system without O_TMPFILE support
            pass
        else:
            return fd, folder / "(anonymous Lanczos basis)", None
    fd, name = tempfile.mkstemp(prefix="lanczos_basis_", suffix=".f64", dir=folder)
    try:
        os.unlink(name)
    except OSError:
        return fd, Path(name), Path(name)
    return fd, Path(name), None
