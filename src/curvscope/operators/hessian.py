"""Hessian of the mean loss over a data source, by double backward (reverse over reverse)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from .data import Batch, UnpackBatch
from .dataset import DatasetCurvatureOperator, LossFn
from .functional import ParamSpec

MatmatMode = Literal["auto", "batched", "loop"]


class HessianOperator(DatasetCurvatureOperator):
    """Hessian of the mean loss over every sample of ``data`` w.r.t. the flat parameters.

    H = (1/N) sum_b |b| * d^2 L_b / d theta^2, with L_b the mean loss of batch b, so an uneven
    last batch is exact. Each batch's gradient graph is built once per product and reused by
    all k vectors of a block (one data pass per ``matmat``).

    Products use plain ``torch.autograd`` double backward (reverse over reverse): the batch's
    gradient graph is built once and all k vectors of a block go back through it, about
    1 + 2k gradients' work. It works for every loss and layer. ``torch.func``
    forward-over-reverse was measured and rejected: on the CPU it was slower even for one
    vector (3.5 vs 2.9 gradients on a 0.86M-parameter MLP), it raises "ZeroTensors are
    immutable" with ``F.mse_loss`` on torch 2.13, and with BatchNorm in train mode it returns
    a wrong Hessian without an error.

    Args:
        matmat_mode: How k vectors share a batch's graph: "batched" (one vmapped backward,
            ``is_grads_batched``), "loop" (k backward passes through the retained graph) or
            "auto": loop on CPU, where it measured faster (benchmarks/hvp_cost.py), batched
            elsewhere, falling back to loop when an operation has no batching rule.
        See :class:`~curvscope.operators.dataset.DatasetCurvatureOperator` for the others.

    Shapes:
        ``matvec``: (n,) -> (n,); ``matmat``: (n, k) -> (n, k).
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
    ) -> None:
        if matmat_mode not in ("auto", "batched", "loop"):
            raise ValueError(
                f"matmat_mode must be 'auto', 'batched' or 'loop', not {matmat_mode!r}"
            )
        self.matmat_mode = matmat_mode
        super().__init__(
            model, loss_fn, data, params, dtype, device, unpack_batch, check_determinism
        )
        if self.matmat_mode == "auto" and self.device.type == "cpu":
            self.matmat_mode = "loop"

    def batch_gradient(self, batch: Batch) -> list[torch.Tensor]:
        """Gradient of the batch's mean loss, with its graph kept for a second backward."""
        leaves = self.function.param_list()
        loss = self.batch_loss(batch)
        return list(
            torch.autograd.grad(
                loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True
            )
        )

    def batch_products(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Products of the batch Hessian with the rows (k, n) by reverse over reverse."""
        leaves = self.function.param_list()
        grads = self.batch_gradient(batch)
        k = rows.shape[0]
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:  # the gradient does not depend on the parameters: zero Hessian
            return torch.zeros_like(rows)
        tangents = self.function.split(rows)
        outputs = [grads[i] for i in live]

        def second_backward(grad_outputs: list[torch.Tensor], batched: bool, retain: bool):
            return torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=grad_outputs,
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )

        if k > 1 and self.matmat_mode in ("auto", "batched"):
            try:
                return self.function.join_rows(
                    second_backward([tangents[i] for i in live], True, True), k
                )
            except RuntimeError:
                if self.matmat_mode == "batched":
                    raise
                self.matmat_mode = "loop"  # some op lacks a batching rule: remember it
        out = torch.empty_like(rows)
        for j in range(k):
            parts = second_backward([tangents[i][j] for i in live], False, j < k - 1)
            self.function.join(parts, out=out[j])
        return out
