"""Papyan's class/cross-class/within-class decomposition of the Gauss-Newton matrix.

For cross-entropy the loss Hessian in the logits of sample i factors exactly as
diag(p_i) - p_i p_i^T = sum_c' a_{i,c'} a_{i,c'}^T with a_{i,c'} = sqrt(p_{i,c'}) (e_c' - p_i);
for ``F.mse_loss`` (mean over the batch's B x C entries) as (2 / C) I = sum_c' a a^T with
a_{i,c'} = sqrt(2 / C) e_c'. With delta_{i,c'} = J_i^T a_{i,c'} ("the gradient of sample i
had its label been c'", up to a scalar — Papyan 2019, arXiv:1901.08244):

    G = (1/N) sum_i sum_c' delta_{i,c'} delta_{i,c'}^T.

Grouping the samples by their true class c (N_c of them), with the means
delta_{c,c'} = Ave_{i in c} delta_{i,c'} and delta_c = Ave_c' delta_{c,c'}:

    G = sum_c (N_c/N) C delta_c delta_c^T                          class means    (rank <= C)
      + sum_c (N_c/N) sum_c' (delta_{c,c'} - delta_c)(...)^T       cross-class    (rank <= C(C-1))
      + (1/N) sum_i sum_c' (delta_{i,c'} - delta_{c,c'})(...)^T    within-class   (the rest)

exactly (two nested mean/covariance splits). The first two terms are explicit low-rank
operators built from C^2 vectors; the within-class term is G minus them, so the three add up
to G to rounding. J_i is the derivative of sample i's output within its batch, so the split
stays exact with BatchNorm in train mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import all_reduce_sum_, is_distributed
from .data import Batch, UnpackBatch
from .dataset import LossFn
from .functional import ParamSpec, preserved_rng
from .ggn import GGNOperator
from .lowrank import LinearCombination, LowRankOperator

LossKind = Literal["cross_entropy", "mse"]


@dataclass
class ClassDecomposition:
    """G = class_means + cross_class + within_class, each an operator on the flat parameters.

    Attributes:
        ggn: The Gauss-Newton operator G.
        class_means: sum_c (N_c/N) C delta_c delta_c^T, rank <= C.
        cross_class: sum_c (N_c/N) sum_c' (delta_{c,c'} - delta_c)(...)^T, rank <= C(C-1).
        within_class: G - class_means - cross_class.
        pair_means: delta_{c,c'} as a (C, C, n) tensor.
        class_counts: N_c, shape (C,).
    """

    ggn: GGNOperator
    class_means: LowRankOperator
    cross_class: LowRankOperator
    within_class: LinearCombination
    pair_means: torch.Tensor
    class_counts: torch.Tensor

    def terms(self) -> dict[str, Any]:
        """The operators by name, for spectra side by side."""
        return {
            "ggn": self.ggn,
            "class_means": self.class_means,
            "cross_class": self.cross_class,
            "within_class": self.within_class,
        }


def _factor_rows(loss: LossKind, outputs: torch.Tensor) -> torch.Tensor:
    """a_{i,c'} for every sample and label slot: shape (B, C, C) = (sample, c', output)."""
    B, C = outputs.shape
    eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
    if loss == "cross_entropy":
        p = torch.softmax(outputs.detach(), dim=1)
        return p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
    return (2.0 / C) ** 0.5 * eye.expand(B, C, C)


def _true_classes(loss: LossKind, targets: torch.Tensor, C: int) -> torch.Tensor:
    if loss == "cross_entropy":
        if targets.is_floating_point() or targets.ndim != 1:
            raise ValueError(
                "class structure with cross_entropy needs integer class targets of shape (B,)"
            )
        return targets.long()
    if targets.ndim != 2 or targets.shape[1] != C:
        raise ValueError(
            f"class structure with mse needs one-hot-like targets of shape (B, {C}); the true "
            "class is taken as the argmax of each target row"
        )
    return targets.argmax(dim=1)


def _check_factor(op: GGNOperator, loss: LossKind, batch: Batch) -> None:
    """Refuse a loss whose Hessian in the outputs is not the one ``loss`` names."""
    with torch.enable_grad():
        outputs = op.batch_outputs(batch).detach()
        leaf, gradient = op.output_loss_gradient(batch, outputs)
        generator = torch.Generator().manual_seed(0)
        U = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype).to(outputs)
        (exact,) = torch.autograd.grad(gradient, leaf, grad_outputs=U)
    A = _factor_rows(loss, outputs)  # (B, C', C)
    factored = torch.einsum("bko,bkp,bp->bo", A, A, U) / outputs.shape[0]
    if not torch.allclose(exact, factored, rtol=1e-5, atol=1e-8 * float(exact.abs().max())):
        raise ValueError(
            f"loss_fn's Hessian in the outputs is not that of mean-reduced {loss} (checked on "
            f"batch 0): pass the loss kind that loss_fn computes (cross_entropy or mse, mean "
            "reduction, no class weights)"
        )


def class_decomposition(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    loss: LossKind = "cross_entropy",
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    unpack_batch: UnpackBatch | None = None,
    **operator_options: Any,
) -> ClassDecomposition:
    """Build G and its class-means, cross-class and within-class terms (Papyan 2019).

    Costs one data pass with C^2 backward passes per batch (the delta_{c,c'}), and keeps
    C^2 vectors of length n. Arguments as :class:`GGNOperator`, plus ``loss``: the kind of
    ``loss_fn`` ("cross_entropy" with integer targets, or "mse" with one-hot targets), and
    ``operator_options`` for the Gauss-Newton operator (``keep_graphs``, ``allow_tf32``, ...).
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', not {loss!r}")
    ggn = GGNOperator(
        model,
        loss_fn,
        data,
        params=params,
        dtype=dtype,
        device=device,
        unpack_batch=unpack_batch,
        **operator_options,
    )
    function = ggn.function
    leaves = function.param_list()
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    with preserved_rng(), torch.enable_grad():
        for batch in ggn.source:
            outputs = ggn.batch_outputs(batch)
            if outputs.ndim != 2:
                raise ValueError(
                    f"class structure needs outputs of shape (B, C), got {tuple(outputs.shape)}"
                )
            B, C = outputs.shape
            if sums is None:
                _check_factor(ggn, loss, batch)
                sums = torch.zeros(C * C, ggn.num_params, dtype=ggn.dtype, device=ggn.device)
                counts = torch.zeros(C, dtype=ggn.dtype, device=ggn.device)
            classes = _true_classes(loss, batch.targets, C)
            A = _factor_rows(loss, outputs)  # (B, c', output)
            onehot = torch.nn.functional.one_hot(classes, C).to(A)  # (B, c)
            # cotangent for (c, c'): rows of class c carry a_{i,c'}; (C*C, B, C)
            cotangents = torch.einsum("bc,bko->ckbo", onehot, A).reshape(C * C, B, C)
            sums.add_(ggn.backward([outputs], leaves, [cotangents], out=torch.empty_like(sums)))
            counts.add_(onehot.sum(dim=0))
    if sums is None or counts is None:
        raise ValueError("data yielded no batches" + (" on this rank" if is_distributed() else ""))
    if is_distributed():  # each rank walked its shard: sum the class sums over ranks
        all_reduce_sum_(sums)
        all_reduce_sum_(counts)
    if torch.any(counts == 0):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples in the data: drop them or add data")
    N = counts.sum()
    pair_means = (sums.reshape(C, C, -1) / counts[:, None, None]).contiguous()  # (c, c', n)
    class_mean = pair_means.mean(dim=1)  # (c, n)
    share = counts / N
    class_means = LowRankOperator(class_mean.T.contiguous(), C * share)
    cross_columns = (pair_means - class_mean[:, None, :]).reshape(C * C, -1)
    cross_class = LowRankOperator(cross_columns.T.contiguous(), share.repeat_interleave(C))
    within = LinearCombination([(1.0, ggn), (-1.0, class_means), (-1.0, cross_class)])
    return ClassDecomposition(ggn, class_means, cross_class, within, pair_means, counts)
