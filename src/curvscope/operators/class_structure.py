"""Papyan's hierarchical split of the Gauss-Newton matrix: G = G0 + G1 + G2 + within-class.

Reference: V. Papyan, "Measurements of three-level hierarchical structure in the outliers in
the spectrum of deepnet Hessians", ICML 2019 (arXiv:1901.08244), and its code,
github.com/deep-lab/DeepnetHessian, ``hessian.py``: ``compute_delta_c_cp`` (the pair means)
and ``compute_G_decomp`` (the terms G0, G1, G2, G1+2).

Per-sample factors. For cross-entropy the loss Hessian in the logits of sample i factors
exactly as diag(p_i) - p_i p_i^T = sum_c' a_{i,c'} a_{i,c'}^T, a_{i,c'} = sqrt(p_{i,c'})
(e_c' - p_i) (``compute_delta_c_cp``: ``w = (e_cp - p) * sqrt(p_cp)``); for ``F.mse_loss``
(mean over the batch's B x C entries) as (2 / C) I = sum_c' a a^T with a_{i,c'} =
sqrt(2 / C) e_c'. With J_i = d f(x_i) / d theta (C, n) and

    delta_{i,c'} = J_i^T a_{i,c'}      ("the gradient of sample i had its label been c'"),

    G = (1/N) sum_i sum_c' delta_{i,c'} delta_{i,c'}^T.                                   (1)

Means. Sample i has true class c (N_c samples, pi_c = N_c / N):

    mu_{c,c'} = (1/N_c) sum_{i in c} delta_{i,c'}                  pair means, (C, C, n)
    mu_c      = (1/(C-1)) sum_{c' != c} mu_{c,c'}                  class means
    nu_{c,c'} = mu_{c,c'} - mu_c  (c' != c)                       cross-class deviations

(``compute_G_decomp``: ``mu`` averages ``mu_ccp[c][c_]`` over ``c_ != c`` and divides by
C - 1; no global mean is subtracted.) Since sum_{c' != c} nu_{c,c'} = 0, two nested
mean/second-moment splits give exactly

    G = G0 + G1 + G2 + W,                                                                (2)
    G0 = sum_c pi_c mu_{c,c} mu_{c,c}^T                         true-label means, rank <= C
    G1 = sum_c pi_c (C-1) mu_c mu_c^T                           class means,      rank <= C
    G2 = sum_c pi_c sum_{c' != c} nu_{c,c'} nu_{c,c'}^T         cross-class,   rank <= C(C-2)
    W  = (1/N) sum_i sum_c' (delta_{i,c'} - mu_{c_i,c'})(...)^T  within-class (the rest)

and G1 + G2 = sum_c pi_c sum_{c' != c} mu_{c,c'} mu_{c,c'}^T ("G1+2"). For balanced classes
(pi_c = 1/C) G0, G1, G2 are the code's ``mu_cc_T_mu_cc`` (Gram / C), ``muTmu`` (Gram *
(C-1) / C) and ``gram_nu_flat`` (Gram / C): the same nonzero eigenvalues. The code's
``G12_eigval`` Grams all C^2 pair means, c' = c included, so it is G0 + G1 + G2 = G - W
(:attr:`ClassDecomposition.all_pairs`), not G1 + G2.

Global per-logit means. beta_{c'} = sum_c pi_c mu_{c,c'} = (1/N) sum_i delta_{i,c'} splits
(1) as G = B + sum_c' Cov_i(delta_{i,c'}) with

    B = sum_c' beta_{c'} beta_{c'}^T                             global means, rank <= C,  (3)

the rest positive semi-definite. For cross-entropy at a uniform softmax (p_i = 1/C, e.g. at
initialisation) sum_c' delta_{i,c'} = 0, so the beta_{c'} sum to zero and B has rank C - 1:
these are the C - 1 outliers of G at initialisation (docs/structure.md). For MSE B has rank C.

G0, G1, G2, G1+2, G0+G1+G2 and B are explicit low-rank operators on the C^2 vectors
mu_{c,c'} (and C(C-1) vectors nu); W is G minus G0, G1 and G2, so (2) holds to rounding. J_i
is the derivative of sample i's output within its batch, so the split stays exact with
BatchNorm in train mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import all_reduce_sum_, is_distributed
from .batches import Batch, UnpackBatch
from .dataset_operator import LossFn
from .functional import ParamSpec, preserved_rng
from .ggn import GGNOperator
from .lowrank import LinearCombination, LowRankOperator

LossKind = Literal["cross_entropy", "mse"]


@dataclass
class ClassDecomposition:
    """G = true_label + class_means + cross_class + within_class (Papyan's G0 + G1 + G2 + W).

    Built from ``pair_means`` and ``class_counts``; every term is an operator on the flat
    parameters (formulas in the module docstring, with pi_c = N_c / N).

    Attributes:
        ggn: The Gauss-Newton operator G.
        pair_means: mu_{c,c'} = Ave_{i in c} delta_{i,c'}, shape (C, C, n) = (true class,
            label slot c', parameter).
        class_counts: N_c, shape (C,).
        true_label: G0 = sum_c pi_c mu_{c,c} mu_{c,c}^T; C columns.
        class_means: G1 = sum_c pi_c (C-1) mu_c mu_c^T, mu_c = Ave_{c' != c} mu_{c,c'};
            C columns.
        cross_class: G2 = sum_c pi_c sum_{c' != c} nu_{c,c'} nu_{c,c'}^T,
            nu_{c,c'} = mu_{c,c'} - mu_c; C(C-1) columns (c-major, c' != c), rank <= C(C-2).
        within_class: W = G - G0 - G1 - G2 = (1/N) sum_i sum_c' (delta_{i,c'} -
            mu_{c_i,c'})(...)^T.
        class_and_cross: G1 + G2 = sum_c pi_c sum_{c' != c} mu_{c,c'} mu_{c,c'}^T (the
            "G1+2"); columns: all C^2 pair means, weight 0 where c' = c.
        all_pairs: G0 + G1 + G2 = sum_c pi_c sum_c' mu_{c,c'} mu_{c,c'}^T = G - W (what
            Papyan's code reports as ``G12_eigval``); C^2 columns.
        global_means: B = sum_c' beta_c' beta_c'^T, beta_c' = sum_c pi_c mu_{c,c'}; C
            columns. Not part of the split: G - B is the per-logit covariance, PSD.
    """

    ggn: GGNOperator
    pair_means: torch.Tensor
    class_counts: torch.Tensor
    true_label: LowRankOperator = field(init=False)
    class_means: LowRankOperator = field(init=False)
    cross_class: LowRankOperator = field(init=False)
    within_class: LinearCombination = field(init=False)
    class_and_cross: LowRankOperator = field(init=False)
    all_pairs: LowRankOperator = field(init=False)
    global_means: LowRankOperator = field(init=False)

    def __post_init__(self) -> None:
        C, _, n = self.pair_means.shape
        if C < 2 or self.class_counts.shape != (C,):
            raise ValueError(
                f"pair_means must be (C, C, n) with C >= 2 and class_counts (C,), got "
                f"{tuple(self.pair_means.shape)} and {tuple(self.class_counts.shape)}"
            )
        mu = self.pair_means
        share = self.class_counts / self.class_counts.sum()  # pi_c
        off = ~torch.eye(C, dtype=torch.bool, device=mu.device)  # (c, c'): c' != c
        own = torch.diagonal(mu, dim1=0, dim2=1)  # (n, C): mu_{c,c}
        class_mean = (mu.sum(dim=1) - own.T) / (C - 1)  # (C, n): mu_c
        nu = mu[off]  # (C(C-1), n), c-major: mu_{c,c'} for c' != c, then minus mu_c
        nu.view(C, C - 1, n).sub_(class_mean[:, None, :])
        every = mu.reshape(C * C, n).T  # (n, C^2), a view
        self.true_label = LowRankOperator(own, share)
        self.class_means = LowRankOperator(class_mean.T, (C - 1) * share)
        self.cross_class = LowRankOperator(nu.T, share.repeat_interleave(C - 1))
        self.within_class = LinearCombination(
            [
                (1.0, self.ggn),
                (-1.0, self.true_label),
                (-1.0, self.class_means),
                (-1.0, self.cross_class),
            ]
        )
        pair_weights = share[:, None].expand(C, C)
        self.class_and_cross = LowRankOperator(every, (pair_weights * off).reshape(-1))
        self.all_pairs = LowRankOperator(every, pair_weights.reshape(-1))
        beta = torch.einsum("c,ckn->kn", share, mu)  # (C, n): beta_{c'}
        self.global_means = LowRankOperator(beta.T, torch.ones_like(share))

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return int(self.pair_means.shape[0])

    def split(self) -> dict[str, Any]:
        """The four terms of G = G0 + G1 + G2 + W, by name (they add up to G to rounding)."""
        return {
            "true_label": self.true_label,
            "class_means": self.class_means,
            "cross_class": self.cross_class,
            "within_class": self.within_class,
        }

    def terms(self) -> dict[str, Any]:
        """G, its split and the derived terms (G1+2, G0+G1+G2, B), for spectra side by side."""
        return {
            "ggn": self.ggn,
            **self.split(),
            "class_and_cross": self.class_and_cross,
            "all_pairs": self.all_pairs,
            "global_means": self.global_means,
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


def factor_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the loss-kind check: sqrt(eps) of ``dtype``.

    1.5e-8 in float64, 3.5e-4 in float32. A wrong kind, reduction or class weighting is off by O(1).
    """
    return float(torch.finfo(dtype).eps) ** 0.5


def _check_factor(op: GGNOperator, loss: LossKind, batch: Batch) -> None:
    """Refuse a loss whose Hessian in the outputs is not the one ``loss`` names.

    Compares H_L U (autograd through ``loss_fn``) with sum_c' a a^T U / B for a random U,
    in the norm over the batch, to :func:`factor_tolerance` of the outputs' dtype.
    """
    with torch.enable_grad():
        outputs = op.batch_outputs(batch).detach()
        leaf, gradient = op.output_loss_gradient(batch, outputs)
        generator = torch.Generator().manual_seed(0)
        U = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype).to(outputs)
        (exact,) = torch.autograd.grad(gradient, leaf, grad_outputs=U)
    A = _factor_rows(loss, outputs)  # (B, C', C)
    factored = torch.einsum("bko,bkp,bp->bo", A, A, U) / outputs.shape[0]
    error = float((exact - factored).norm())
    if not error <= factor_tolerance(outputs.dtype) * float(exact.norm()):
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
    """Build G and Papyan's terms G0, G1, G2, W (plus G1+2, G0+G1+G2 and B), ICML 2019.

    Costs one data pass with C^2 backward passes per batch (the pair sums of delta_{i,c'}),
    and keeps about 2 C^2 vectors of length n (mu_{c,c'} and nu_{c,c'}). Arguments as
    :class:`GGNOperator`, plus ``loss``: the kind of ``loss_fn`` ("cross_entropy" with
    integer targets, or "mse" with one-hot targets), and ``operator_options`` for the
    Gauss-Newton operator (``keep_graphs``, ``allow_tf32``, ...). Needs C >= 2 classes, each
    present in the data.
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
            if outputs.ndim != 2 or outputs.shape[1] < 2:
                raise ValueError(
                    "class structure needs outputs of shape (B, C) with C >= 2 classes, got "
                    f"{tuple(outputs.shape)}"
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
    pair_means = (sums.reshape(C, C, -1) / counts[:, None, None]).contiguous()  # (c, c', n)
    return ClassDecomposition(ggn, pair_means, counts)
