"""Named losses shared by the ``curvscope`` command, the experiments and the docs.

Each is ``loss(outputs, targets) -> the mean loss of the batch`` (a scalar tensor), the form
every operator and the :class:`~curvscope.tracking.Tracker` take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries (``F.mse_loss``).

    Args:
        outputs: Model outputs of shape (b, C) (or any shape matching ``targets``).
        targets: Targets of the outputs' shape, or integer class labels of shape (b,), which
            are one-hot encoded to (b, C) first (MSE on one-hot targets, as Cohen et al. 2021
            train).

    Returns:
        The mean of (outputs - targets)^2 over all b x C entries, a scalar tensor.
    """
    if not targets.is_floating_point() and outputs.ndim == targets.ndim + 1:
        targets = F.one_hot(targets, outputs.shape[-1])
    return F.mse_loss(outputs, targets.to(outputs.dtype))


#: Losses by the names ``--loss`` takes.
LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": mse_loss,
}
