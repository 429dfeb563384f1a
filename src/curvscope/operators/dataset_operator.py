"""Curvature of the mean loss over a whole data source, accumulated batch by batch.

Subclasses (Hessian, Gauss-Newton, ...) say how one batch's curvature acts on a block of
vectors; this class walks the data, weights each batch by its size (so an uneven last batch is
exact), checks inputs and results, and keeps the model untouched.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_total_
from ..resources import memory_share
from ..rng import preserved_rng
from .autodiff import MatmatMode, RowBackward, resolve_mode
from .base import CurvatureOperator
from .batches import Batch, DataSource, UnpackBatch, is_shuffling
from .functional import ModelFunction, ParamSpec, batchnorm_in_train_mode, random_modules
from .graph_cache import GraphCache, KeepGraphs
from .precision import ieee_float32

LossFn = Callable[[Any, Any], torch.Tensor]


class DatasetCurvatureOperator(CurvatureOperator):
    """Operator of the form (1/N) sum_b |b| C_b, with C_b the curvature of batch b's mean loss.

    Args:
        model: Any ``nn.Module``; never modified (see :mod:`curvscope.operators.functional`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's *mean* loss (a scalar).
        data: Re-iterable of batches (list or DataLoader), walked once per product.
        params: Subset of parameters to analyse (names or parameters); default all trainable.
        dtype: Product dtype; default float64 on CPU, the model's dtype on GPU.
        device: Where products run; default the model's device.
        unpack_batch: ``batch -> (inputs, targets)`` for batches that are not pairs.
        check_determinism: Evaluate the first batch's loss twice at construction and refuse a
            random forward pass (dropout written with ``F.dropout``, say).
        matmat_mode: How k vectors share a batch's graph: "loop" (k backward passes through
            the retained graph), "batched" (one vmapped pass, ``is_grads_batched``) or "auto":
            loop on the CPU, batched for recurrent models on the CPU and for every model on
            other devices, with a fallback to loop when an operation has no batching rule
            (:mod:`.autodiff`; measurements in docs/benchmarks.md, "Product method").
        keep_graphs: Keep what a product builds for a batch before the vectors come in (its
            activations and first backward), since the parameters never move during an
            analysis: "auto" (default) keeps the graphs of the batches that fit in
            ``graph_memory`` bytes, in data order, and rebuilds the others on every product;
            True keeps every batch's; False none. Results are bit-identical either way.
            With a shuffling ``DataLoader`` "auto" keeps nothing.
        graph_memory: Budget of "auto" in bytes; default a quarter of the memory available
            when the operator is built (``MemAvailable`` on the CPU, free device memory on
            CUDA; 1 GiB where neither can be read). A graph's size is the storage of the
            tensors autograd saves for it plus its roots, counted while it is built (the
            parameters, which exist anyway, not counted).
        allow_tf32: Let products use the reduced float32 precision the user's backend
            settings allow (TF32 convolutions are PyTorch's default on recent GPUs, ~1e-3
            relative error). Default False: every product runs in full IEEE float32 (see
            :mod:`curvscope.operators.precision`); the settings are restored afterwards.

    Attributes:
        num_samples: N, the samples seen by the last data pass (None before the first).
        kept_graph_bytes: Bytes of the graphs kept now by "auto" (0 before the first product).
        num_params: n.
        param_names: Analysed parameter names in flat-vector order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        params: ParamSpec = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        unpack_batch: UnpackBatch | None = None,
        check_determinism: bool = True,
        matmat_mode: MatmatMode = "auto",
        keep_graphs: KeepGraphs = "auto",
        graph_memory: int | None = None,
        allow_tf32: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar")
        refuse_non_mean_reduction(loss_fn)
        self.function = ModelFunction(model, params=params, dtype=dtype, device=device)
        super().__init__(self.function.num_params, self.function.dtype, self.function.device)
        self.loss_fn = loss_fn
        self.allow_tf32 = bool(allow_tf32)
        self.source = DataSource(data, self.device, self.dtype, unpack_batch)
        self.num_samples: int | None = None
        self.backward = RowBackward(resolve_mode(matmat_mode, self.device, self.function.recurrent))
        shuffling = is_shuffling(data)
        self.graph_cache = GraphCache(
            keep_graphs,
            int(graph_memory) if graph_memory is not None else default_graph_memory(self.device),
            self.function.param_list(),
            shuffling,
        )
        self._refuse_randomness(model, shuffling)
        with preserved_rng(), torch.enable_grad():
            # Inside preserved_rng: a DataLoader draws its base seed from the global RNG on
            # every pass, shuffling or not.
            first = self.source.first()
            loss = self.batch_loss(first)
            if check_determinism:
                again = self.batch_loss(first)
                if not torch.allclose(loss, again, rtol=1e-6, atol=0.0):
                    raise ValueError(
                        f"two evaluations of the loss on batch 0 differ ({loss.item():.10g} vs "
                        f"{again.item():.10g}): the forward pass is random (dropout?), which "
                        "makes the curvature random. Call model.eval() or remove the randomness"
                    )
        if check_determinism and not shuffling:
            # A second pass, from the same RNG state as every product's pass: random data
            # augmentation that preserved_rng does not restore (Python's random) shows up here.
            with preserved_rng():
                second = self.source.first()
            if not _same_data(first.inputs, second.inputs) or not _same_data(
                first.targets, second.targets
            ):
                raise ValueError(
                    "batch 0 differs between two passes over the data (random augmentation "
                    "in the dataset's transforms?): every product walks the data again, so "
                    "the curvature would be random. Analyse a loader without random "
                    "transforms, or a fixed list of batches"
                )

    @property
    def matmat_mode(self) -> str:
        """How blocks share a batch's graph now: "loop", "batched" or "auto"."""
        return self.backward.mode

    @matmat_mode.setter
    def matmat_mode(self, mode: str) -> None:
        self.backward.mode = resolve_mode(mode, self.device, self.function.recurrent)

    @property
    def keep_graphs(self) -> KeepGraphs:
        """The keep_graphs mode: "auto", True or False (see the constructor)."""
        return self.graph_cache.mode

    @property
    def graph_memory(self) -> int:
        """Budget of ``keep_graphs="auto"`` in bytes."""
        return self.graph_cache.budget

    @property
    def kept_graph_bytes(self) -> int:
        """Bytes of the graphs kept now (0 before the first product)."""
        return self.graph_cache.kept_bytes

    def release_graphs(self) -> None:
        """Free the kept graphs (they are rebuilt, and kept again, on next use)."""
        self.graph_cache.clear()

    @property
    def num_params(self) -> int:
        """n, the length of the flat parameter vector."""
        return self.shape[0]

    @property
    def param_names(self) -> list[str]:
        """Analysed parameter names in flat-vector order."""
        return list(self.function.names)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector (n,) -> {parameter name: tensor of that parameter's shape}."""
        return self.function.unflatten(v)

    def _refuse_randomness(self, model: nn.Module, shuffling: bool) -> None:
        random = random_modules(model)
        if random:
            raise ValueError(
                f"modules {random} are random in train mode, which makes the curvature random: "
                "call model.eval() (BatchNorm layers keep using population statistics then), "
                "or set their p=0 for the analysis"
            )
        if shuffling and batchnorm_in_train_mode(model):
            raise ValueError(
                "BatchNorm in train mode makes each batch's composition part of the loss, and "
                "this DataLoader shuffles, so every product would see another loss: pass a "
                "DataLoader with shuffle=False (or a fixed list of batches), or call model.eval()"
            )

    def batch_loss(
        self, batch: Batch, leaves: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The checked scalar mean loss of one batch at the frozen parameters."""
        return self.check_loss(
            self.loss_fn(self.function.outputs(batch, leaves), batch.targets), batch
        )

    def check_loss(self, loss: Any, batch: Batch) -> torch.Tensor:
        """``loss`` as a 0-d tensor, or a clear error when it is not a finite scalar."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn returned {shape} on batch {batch.index}: it must return the batch's "
                "mean loss as a scalar tensor (e.g. reduction='mean')"
            )
        if not torch.isfinite(loss).all():
            raise ValueError(
                f"the loss is {loss.item()} on batch {batch.index}: curvature of a non-finite "
                "loss is meaningless; check the model's parameters and this batch's data"
            )
        return loss.reshape(())

    @abstractmethod
    def batch_products(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Curvature of ``batch``'s mean loss applied to each row of ``rows`` (k, n) -> (k, n).

        Blocks travel as rows inside the operators so that every vector, and every
        parameter's slice of it, is contiguous in memory.
        """

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # The numerics hand over row-major blocks as transposed views (V = rows.T): no copy.
        rows = V.T if V.T.is_contiguous() else V.T.contiguous()
        total = torch.zeros_like(rows)
        num_samples = 0
        with preserved_rng(), torch.enable_grad(), ieee_float32(not self.allow_tf32):
            for batch in self.source:
                product = self.batch_products(batch, rows)
                # One reduction instead of an elementwise test; exact check only on alarm.
                if not torch.isfinite(product.sum()) and not torch.isfinite(product).all():
                    raise ValueError(
                        f"the curvature product is not finite on batch {batch.index}: "
                        "the loss overflows in its second derivative there; check that batch "
                        "and the model's parameters"
                    )
                total.add_(product, alpha=float(batch.size))
                num_samples += batch.size
        num_samples = all_reduce_total_(total, num_samples)  # each rank walked its shard
        if num_samples == 0:
            raise ValueError(
                "data yielded no batches on this pass: the data source must be re-iterable "
                "(a list or a DataLoader, not a generator)"
            )
        if self.num_samples is not None and num_samples != self.num_samples:
            raise ValueError(
                f"the data yielded {num_samples} samples on this pass but {self.num_samples} "
                "before: the data source must give the same samples on every pass"
            )
        self.num_samples = num_samples
        # (n, k) view of the row-major result: apply_rows turns it back into rows for free.
        return total.div_(num_samples).T


def refuse_non_mean_reduction(loss_fn: Any) -> None:
    """Refuse a loss whose declared reduction is not the batch mean.

    The operators weight each batch's loss by its size to form the mean loss over the data,
    so ``loss_fn`` must return the batch *mean*. A sum (``nn.CrossEntropyLoss(reduction=
    "sum")``, ``functools.partial(F.cross_entropy, reduction="sum")``) would silently give
    the Hessian of sum_b |b| L_b / N, not of the mean loss. What can be seen is checked: a
    ``reduction`` attribute of a loss module, or a ``reduction`` keyword bound by
    ``functools.partial``; a plain function that sums is not detectable.
    """
    reduction = getattr(loss_fn, "reduction", None)
    where = f"{type(loss_fn).__name__}(reduction={reduction!r})"
    if reduction is None and isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction")
        where = f"functools.partial(..., reduction={reduction!r})"
    if reduction is None or reduction in ("mean", "elementwise_mean"):
        return
    if reduction in ("sum", "none"):
        raise ValueError(
            f"loss_fn is {where}: curvscope needs each batch's mean loss (it weights batches "
            "by their size to form the mean loss over all samples, whose Hessian it measures). "
            "Use reduction='mean'; for the Hessian of the summed loss over N samples, "
            "multiply the results (eigenvalues, trace) by N"
        )


def _same_data(a: Any, b: Any) -> bool:
    """Equal tensors (values, shapes, dtypes) in the same nested structure."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_data(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: do not refuse them
        return True


#: Share of the memory available when an operator is built that "auto" lets kept graphs use.
AUTO_GRAPH_SHARE = 0.25


def default_graph_memory(device: torch.device) -> int:
    """A quarter of the memory available now on ``device`` (1 GiB where it can't be read)."""
    return memory_share(device, AUTO_GRAPH_SHARE)
