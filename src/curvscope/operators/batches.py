"""How a data source is walked: batches, their sizes, and where their tensors go.

A data source is any re-iterable of batches (a list, a ``DataLoader``). By default a batch is
an ``(inputs, targets)`` pair; other shapes (Hugging Face dicts, several model inputs) go
through ``unpack_batch(batch) -> (inputs, targets)``. ``inputs`` may be a tensor
(``model(inputs)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

UnpackBatch = Callable[[Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Batch:
    """One batch ready for the model: tensors moved to the operator's device and dtype."""

    index: int
    inputs: Any
    targets: Any
    size: int


def default_unpack(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)``; only pairs are accepted."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = type(batch).__name__
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise ValueError(
        f"a batch is a {kind}{size}, not an (inputs, targets) pair: pass "
        "unpack_batch=lambda batch: (inputs, targets) to say how to split it "
        "(inputs may be a tensor, a tuple of positional inputs or a dict of keyword inputs)"
    )


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor found in a (nested) tensor, tuple, list or dict, else None."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def move(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a (nested) tensor, tuple, list or dict to ``device``.

    Floating tensors also become ``dtype`` unless it is None.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and dtype is not None:
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, dict):
        return {key: move(value, device, dtype) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(item, device, dtype) for item in obj)
    return obj


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` with ``inputs`` spread as positional (tuple) or keyword (dict) inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def is_shuffling(data: Iterable[Any]) -> bool:
    """True for a ``DataLoader`` whose sampler draws a new random order on every pass."""
    if not isinstance(data, DataLoader):
        return False
    sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
    return isinstance(sampler, RandomSampler) or isinstance(data.sampler, RandomSampler)


class DataSource:
    """Walks a re-iterable data source, yielding :class:`Batch` objects.

    Args:
        data: Re-iterable of batches (list, tuple, DataLoader). One-shot iterators and
            generators are refused: every product walks the data again.
        device: Device the batches' tensors are moved to.
        dtype: dtype floating tensors (inputs and targets) are cast to.
        unpack_batch: ``batch -> (inputs, targets)``; defaults to :func:`default_unpack`.
    """

    def __init__(
        self,
        data: Iterable[Any],
        device: torch.device,
        dtype: torch.dtype,
        unpack_batch: UnpackBatch | None = None,
    ) -> None:
        if isinstance(data, Iterator) or not isinstance(data, Iterable):
            raise TypeError(
                f"data is a {type(data).__name__}, which can be walked only once (or not at "
                "all): curvature products walk the data many times, so pass a list of "
                "(inputs, targets) batches or a DataLoader"
            )
        self.data = data
        self.device = torch.device(device)
        self.dtype = dtype
        self.unpack_batch = unpack_batch or default_unpack

    def prepare(self, index: int, raw: Any) -> Batch:
        """Unpack and move one raw batch; checks that it holds at least one sample."""
        inputs, targets = self.unpack_batch(raw)
        reference = first_tensor(targets)
        if reference is None:
            reference = first_tensor(inputs)
        if reference is None:
            raise ValueError(f"batch {index} holds no tensor: cannot tell its size")
        size = int(reference.shape[0]) if reference.ndim > 0 else 1
        if size == 0:
            raise ValueError(f"batch {index} is empty: drop empty batches from the data")
        return Batch(
            index=index,
            inputs=move(inputs, self.device, self.dtype),
            targets=move(targets, self.device, self.dtype),
            size=size,
        )

    def __iter__(self) -> Iterator[Batch]:
        for index, raw in enumerate(self.data):
            yield self.prepare(index, raw)

    def first(self) -> Batch:
        """The first batch; raises a clear error when the data yields none."""
        for batch in self:
            return batch
        raise ValueError(
            "data yielded no batches: pass a non-empty DataLoader or list of (inputs, targets)"
        )
