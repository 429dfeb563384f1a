"""Named losses: the one-hot MSE equals F.mse_loss on one-hot targets."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from curvscope.losses import LOSSES, mse_loss


def test_mse_one_hot_encodes_class_labels():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0])
    one_hot = F.one_hot(labels, 3).double()
    torch.testing.assert_close(mse_loss(outputs, labels), F.mse_loss(outputs, one_hot))
    torch.testing.assert_close(mse_loss(outputs, one_hot), F.mse_loss(outputs, one_hot))
    assert LOSSES["mse"] is mse_loss and LOSSES["cross_entropy"] is F.cross_entropy
