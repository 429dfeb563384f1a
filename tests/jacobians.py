"""Dense per-batch output Jacobians and loss Hessians in the outputs, built from scratch with
plain torch.autograd on a float64 deep copy of the model (no curvscope, no torch.func)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def batch_jacobians(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Yield (outputs (B, C), J (B*C, n), targets) per batch: J = d outputs / d theta within the
    batch (with BatchNorm in train mode, sample i's row depends on the whole batch)."""
    ref = copy.deepcopy(model).double()
    leaves = [p for p in ref.parameters() if p.requires_grad]
    for x, y in batches:
        y = y.double() if y.is_floating_point() else y
        out = ref(x.double())
        rows = []
        for value in out.reshape(-1):
            grads = torch.autograd.grad(
                value, leaves, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        yield out.detach(), torch.stack(rows), y


def output_hessian(loss_fn: Callable[[Any, Any], torch.Tensor], outputs, targets) -> torch.Tensor:
    """d^2 loss_fn(outputs, targets) / d outputs^2 as a (B*C, B*C) matrix."""
    shape = outputs.shape
    return torch.autograd.functional.hessian(
        lambda flat: loss_fn(flat.reshape(shape), targets), outputs.reshape(-1)
    )


def dense_ggn(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    """(1/N) sum_b |b| J_b^T H_{L,b} J_b in float64."""
    total = sum(int(y.shape[0]) for _, y in batches)
    G = None
    for out, J, y in batch_jacobians(model, batches):
        term = (out.shape[0] / total) * J.T @ output_hessian(loss_fn, out, y) @ J
        G = term if G is None else G + term
    return G
