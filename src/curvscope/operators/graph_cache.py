"""Per-batch autograd graphs kept across products, within a memory budget.

The parameters never move during an analysis, so whatever a product builds for a batch
before the vectors come in (activations, the first backward, the output-space derivatives)
is the same on every product and can be kept. :class:`GraphCache` keeps those graph roots per
batch index while their size fits a budget; the operators rebuild what is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch

KeepGraphs = bool | Literal["auto"]
T = TypeVar("T", bound=Sequence[torch.Tensor])


class GraphCache:
    """Graph roots per batch index, kept while they fit ``budget`` bytes.

    Args:
        mode: "auto" (keep while they fit ``budget``, in data order), True (keep every
            batch's), False (keep none).
        budget: Bytes "auto" may keep.
        params: Tensors that exist anyway (the frozen parameters): not counted.
        shuffling: The data source reorders its batches on every pass; "auto" then keeps
            nothing (a batch index would hold other samples on the next pass, and a mix of
            kept and rebuilt batches would count samples twice).

    Attributes:
        kept_bytes: Bytes of the graphs kept now ("auto" only; 0 otherwise).
    """

    def __init__(
        self, mode: KeepGraphs, budget: int, params: Sequence[torch.Tensor], shuffling: bool
    ) -> None:
        if mode not in (True, False, "auto"):
            raise ValueError(f"keep_graphs must be True, False or 'auto', not {mode!r}")
        if budget < 0:
            raise ValueError(f"graph_memory must be >= 0 bytes, got {budget}")
        self.mode = mode
        self.budget = int(budget)
        self.params = list(params)
        self.shuffling = shuffling
        self.graphs: dict[int, Sequence[torch.Tensor]] = {}
        self.not_kept: set[int] = set()
        self.kept_bytes = 0

    def clear(self) -> None:
        """Forget every kept graph."""
        self.graphs.clear()
        self.not_kept.clear()
        self.kept_bytes = 0

    def is_kept(self, index: int) -> bool:
        """Whether the graph of batch ``index`` is kept now."""
        return index in self.graphs

    def get(self, index: int, build: Callable[[], T]) -> T:
        """The graph roots of batch ``index``: kept ones, or ``build()`` (kept if allowed)."""
        if index in self.graphs:
            return self.graphs[index]  # type: ignore[return-value]
        if self.mode is True:
            self.graphs[index] = roots = build()
            return roots
        if self.mode is False or self.shuffling or index in self.not_kept:
            return build()
        meter = _SavedBytes(self.params)
        try:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, _unpack):
                roots = build()
        except RuntimeError:
            # Some operations refuse saved-tensor hooks: measure nothing, keep nothing (a
            # genuine error in the model raises again here, without the hooks).
            self.not_kept.add(index)
            return build()
        for tensor in roots:
            meter.pack(tensor)  # the roots themselves (gradients, outputs)
        if self.kept_bytes + meter.bytes <= self.budget:
            self.graphs[index] = roots
            self.kept_bytes += meter.bytes
        else:
            self.not_kept.add(index)
        return roots


class _SavedBytes:
    """Counts the distinct storages autograd saves while a graph is built.

    Storages of the parameters (which exist whether or not the graph is kept) are left out;
    every other storage, the batch's inputs included, is counted once, however often it is
    saved.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.bytes = 0
        self.seen: set[int] = {_storage_id(t) for t in params}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_id(tensor)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_id(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
        return id(tensor)
