"""Hessian of the mean loss over a data source, by double backward (reverse over reverse)."""

from __future__ import annotations

import torch

from .batches import Batch
from .dataset_operator import DatasetCurvatureOperator


class HessianOperator(DatasetCurvatureOperator):
    """Hessian of the mean loss over every sample of ``data`` w.r.t. the flat parameters.

    H = (1/N) sum_b |b| * d^2 L_b / d theta^2, with L_b the mean loss of batch b, so an uneven
    last batch is exact.

    Products use plain ``torch.autograd`` double backward (reverse over reverse): the batch's
    gradient graph is built once and all k vectors of a block go back through it, about
    1 + 2k gradients' work. It works for every loss and layer. ``torch.func``
    forward-over-reverse is not used: it was slower on the CPU, fails with ``F.mse_loss`` on
    torch 2.13 and is wrong with BatchNorm in train mode (docs/benchmarks.md, "Product
    method").

    Kept graphs (``keep_graphs``, "auto" by default): a batch's gradient graph (its
    activations and the first backward) is kept across products while it fits the budget. A
    product then costs one double backward per kept batch instead of a forward, a backward and
    a double backward (about 2k gradients instead of 1 + 2k; docs/benchmarks.md, "HVP cost"),
    with bit-identical results.

    Arguments: see :class:`~curvscope.operators.dataset_operator.DatasetCurvatureOperator`
    (model, loss_fn, data, params, dtype, device, unpack_batch, check_determinism,
    matmat_mode, keep_graphs, graph_memory, allow_tf32).

    Shapes:
        ``matvec``: (n,) -> (n,); ``matmat``: (n, k) -> (n, k).

    Example:
        Least squares through the origin, two samples: L(w) = mean_i (x_i . w - y_i)^2, so
        H = (2 / N) X^T X = diag(1, 4) for X = diag(1, 2), whatever w is:

        >>> import torch
        >>> from torch import nn
        >>> from torch.nn import functional as F
        >>> from curvscope import HessianOperator, spectral_density
        >>> model = nn.Linear(2, 1, bias=False)
        >>> data = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))]
        >>> H = HessianOperator(model, F.mse_loss, data)
        >>> H.shape, H.dtype
        ((2, 2), torch.float64)
        >>> H.to_dense().tolist()
        [[1.0, 0.0], [0.0, 4.0]]
        >>> spectral_density(H, num_iters=2, num_probes=1).nodes.round(6).tolist()
        [[1.0, 4.0]]
    """

    def batch_gradient(self, batch: Batch) -> list[torch.Tensor]:
        """Gradient of the batch's mean loss, with its graph kept for a second backward."""
        leaves = self.function.param_list()

        def build() -> list[torch.Tensor]:
            loss = self.batch_loss(batch)
            return list(
                torch.autograd.grad(
                    loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True
                )
            )

        return self.graph_cache.get(batch.index, build)

    def batch_products(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Products of the batch Hessian with the rows (k, n) by reverse over reverse."""
        grads = self.batch_gradient(batch)
        leaves = self.function.param_list()
        tangents = self.function.split(rows)
        kept = self.graph_cache.is_kept(batch.index)
        return self.backward(grads, leaves, tangents, out=torch.empty_like(rows), retain_graph=kept)
