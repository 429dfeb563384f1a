"""Fisher information (sampled or exact labels) and the empirical Fisher of the mean loss.

Notation. Sample i of the N samples in ``data`` has output f_i = f(x_i; theta), flattened to
D entries, and per-sample loss l_i(y) = l(f_i, y), so that a batch's mean loss is
L_b = (1/|b|) sum_{i in b} l_i(y_i). Its per-sample gradient at a label y is

    g_i(y) = d l(f_i, y) / d theta = J_i^T a_i(y),    a_i(y) = d l(f_i, y) / d f_i,

with J_i = d f_i / d theta (D, n), the derivative of sample i's output *within its batch*.
The three matrices below are (1/N) sum_i J_i^T Lambda_i J_i for different (D, D) matrices
Lambda_i, so their products cost what the Gauss-Newton's do (one J v and one J^T per vector),
and none forms a per-sample gradient:

* empirical Fisher, true labels y_i:           Lambda_i = a_i(y_i) a_i(y_i)^T,
  F_emp = (1/N) sum_i g_i(y_i) g_i(y_i)^T;
* Fisher, exact expectation over the model's predictive distribution p(y | f_i):
  Lambda_i = E_{y ~ p(. | f_i)} a_i(y) a_i(y)^T,  F = (1/N) sum_i E_y g_i(y) g_i(y)^T;
* Monte-Carlo Fisher, S labels y_{i,s} ~ p(. | f_i) drawn once when the operator is built:
  Lambda_i = (1/S) sum_s a_i(y_{i,s}) a_i(y_{i,s})^T,
  F_MC = (1/N) sum_i (1/S) sum_s g_i(y_{i,s}) g_i(y_{i,s})^T, an unbiased estimate of F.

The predictive distribution is the one whose negative log-likelihood the loss is, up to an
additive constant, so that E_y a a^T is the loss's Hessian in the outputs and F equals the
Gauss-Newton matrix G of :class:`~curvscope.operators.GGNOperator` exactly:

* cross-entropy on logits f (C = D classes): p = Categorical(softmax(f)), a(y) = softmax(f)
  - e_y, E_y a a^T = diag(p) - p p^T;
* mean squared error over the D output entries, l = (1/D) ||f - y||^2: p = Normal(f,
  (D/2) I) (l is exactly its negative log-likelihood up to a constant), a(y) = (2/D)(f - y),
  E_y a a^T = (2/D) I.

BatchNorm in train mode: the per-sample gradient g_i is then *defined* as the gradient of
sample i's loss term within its batch (its output depends on the other samples through the
batch statistics), the same per-batch J_i as the Gauss-Newton's, so that sum_{i in b} g_i =
|b| dL_b/d theta still holds and F = G stays exact. It is not the gradient that sample would
have alone, and it depends on how the data are batched (a shuffling DataLoader is refused
with BatchNorm in train mode, as for every operator).
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..distributed import rank
from ..losses import mse_loss
from ..rng import preserved_rng
from .autodiff import MatmatMode
from .batches import Batch, UnpackBatch, is_shuffling
from .dataset_operator import DatasetCurvatureOperator, LossFn
from .functional import ParamSpec
from .graph_cache import KeepGraphs
from .precision import ieee_float32

LossKind = Literal["cross_entropy", "mse"]
FisherMode = Literal["mc", "exact"]

#: Samples of batch 0 whose per-sample gradients the empirical Fisher checks at construction.
CHECKED_SAMPLES = 64


class PerSampleOuterProducts(DatasetCurvatureOperator):
    """(1/N) sum_i J_i^T Lambda_i J_i: the shared machinery of the Fisher operators.

    Per batch, one forward pass and one backward pass with a dummy cotangent u (J^T u, with
    its graph) are kept like the Gauss-Newton's (``keep_graphs``); with them the batch's
    output-space state that Lambda needs (:meth:`output_state`). A block of k vectors then
    costs, per batch, k double backward passes for J V, the small (B, D) products with
    Lambda, and k backward passes for J^T.

    Arguments as :class:`~curvscope.operators.hessian.HessianOperator`.
    """

    def batch_outputs(self, batch: Batch) -> torch.Tensor:
        """The model's (B, ...) output tensor on ``batch``, with its graph to the parameters."""
        outputs = self.function.outputs(batch)
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"the model returned a {type(outputs).__name__}; {type(self).__name__} needs "
                "the single tensor that loss_fn takes: wrap the model so it returns that tensor"
            )
        if outputs.ndim == 0 or outputs.shape[0] != batch.size:
            raise ValueError(
                f"the model's outputs on batch {batch.index} have shape {tuple(outputs.shape)}, "
                f"but the batch holds {batch.size} samples: {type(self).__name__} needs one "
                "output row per sample (outputs of shape (B, ...))"
            )
        if not torch.isfinite(outputs.detach()).all():
            raise ValueError(
                f"the model's outputs are not finite on batch {batch.index}: check that "
                "batch's data and the model's parameters"
            )
        return outputs

    @abstractmethod
    def output_state(self, batch: Batch, outputs: torch.Tensor) -> torch.Tensor:
        """What :meth:`output_products` needs of ``batch`` (``outputs`` detached, (B, ...))."""

    @abstractmethod
    def output_products(self, state: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Lambda_i W[:, i] for every sample i: ``W`` (k, B, D) -> (k, B, D)."""

    def batch_graph(self, batch: Batch) -> list[torch.Tensor]:
        """[outputs, dummy cotangent u, output state, J^T u per parameter (with its graph)]."""
        leaves = self.function.param_list()
        outputs = self.batch_outputs(batch)
        state = self.output_state(batch, outputs.detach())
        # J^T u as a function of a dummy cotangent u: differentiating it along v gives J v.
        dummy = torch.zeros_like(outputs, requires_grad=True)
        transposed = torch.autograd.grad(
            outputs,
            leaves,
            grad_outputs=dummy,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return [outputs, dummy, state, *transposed]

    def batch_products(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """(1/B) sum_{i in b} J_i^T Lambda_i J_i applied to the rows (k, n)."""
        graph = self.graph_cache.get(batch.index, lambda: self.batch_graph(batch))
        outputs, dummy, state, *transposed = graph
        leaves = self.function.param_list()
        k, size = rows.shape[0], outputs.shape[0]
        (jv,) = self.backward(transposed, [dummy], self.function.split(rows))
        lam_jv = self.output_products(state, jv.reshape(k, size, -1)).div_(size)
        return self.backward(
            [outputs], leaves, [lam_jv.reshape(jv.shape)], out=torch.empty_like(rows)
        )


def apply_factors(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """sum_r A[i, r] A[i, r]^T W[:, i] for each sample i: A (B, R, D), W (k, B, D) -> (k, B, D)."""
    return torch.einsum("brd,kbr->kbd", A, torch.einsum("brd,kbd->kbr", A, W))


class EmpiricalFisherOperator(PerSampleOuterProducts):
    """Empirical Fisher F_emp = (1/N) sum_i g_i g_i^T of the mean loss over ``data``.

    g_i is the gradient of sample i's loss at its true label; the loss must be the batch mean
    of per-sample losses, L_b = (1/|b|) sum_i loss_fn(outputs[i:i+1], targets[i:i+1]) (any
    such loss: cross-entropy, MSE, label smoothing, ...), which is checked on the first
    samples of batch 0. It is never formed per sample: F_emp = (1/N) sum_i J_i^T a_i a_i^T J_i
    with a_i = |b| dL_b/d f_i, the per-sample gradient in the outputs (module docstring), so a
    product costs what a Gauss-Newton product costs. With BatchNorm in train mode g_i is the
    gradient of sample i's loss term within its batch (module docstring).

    F_emp is positive semi-definite of rank <= N. It is not the Fisher: it uses the data's
    labels instead of the model's, and it differs from F and from the Gauss-Newton matrix G
    unless the model's predictive distribution matches the labels (docs/fisher.md).

    Arguments as :class:`~curvscope.operators.hessian.HessianOperator`.

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
        keep_graphs: KeepGraphs = "auto",
        graph_memory: int | None = None,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            device=device,
            unpack_batch=unpack_batch,
            check_determinism=check_determinism,
            matmat_mode=matmat_mode,
            keep_graphs=keep_graphs,
            graph_memory=graph_memory,
            allow_tf32=allow_tf32,
        )
        with preserved_rng(), torch.enable_grad(), ieee_float32(not self.allow_tf32):
            first = self.source.first()
            self._check_per_sample_loss(first, self.batch_outputs(first).detach())

    def output_gradients(self, batch: Batch, outputs: torch.Tensor) -> torch.Tensor:
        """a_i = |b| dL_b / d f_i of every sample: (B, ...) like ``outputs``."""
        with torch.enable_grad():
            leaf = outputs.detach().requires_grad_(True)
            loss = self.check_loss(self.loss_fn(leaf, batch.targets), batch)
            (gradient,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
        return gradient.mul_(batch.size)

    def output_state(self, batch: Batch, outputs: torch.Tensor) -> torch.Tensor:
        """The factors a_i of Lambda_i = a_i a_i^T, shape (B, 1, D)."""
        return self.output_gradients(batch, outputs).reshape(batch.size, 1, -1)

    def output_products(self, state: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """a_i (a_i . W[:, i]) for every sample."""
        return apply_factors(state, W)

    def _check_per_sample_loss(self, batch: Batch, outputs: torch.Tensor) -> None:
        """Refuse a loss that is not the batch mean of per-sample losses (checked on batch 0).

        |b| dL_b/d f_i must equal d loss_fn(f_i, y_i)/d f_i for the first
        :data:`CHECKED_SAMPLES` samples, to sqrt(eps) of the dtype.
        """
        batched = self.output_gradients(batch, outputs)
        count = min(batch.size, CHECKED_SAMPLES)
        with torch.enable_grad():
            leaf = outputs[:count].detach().requires_grad_(True)
            losses = [
                self.loss_fn(leaf[i : i + 1], _sample(batch.targets, i)) for i in range(count)
            ]
            if not all(isinstance(x, torch.Tensor) and x.numel() == 1 for x in losses):
                raise ValueError(
                    "loss_fn does not return a scalar on a batch of one sample: the empirical "
                    "Fisher needs per-sample losses loss_fn(outputs[i:i+1], targets[i:i+1])"
                )
            (single,) = torch.autograd.grad(
                sum(x.reshape(()) for x in losses), leaf, allow_unused=True, materialize_grads=True
            )
        expected = batched[:count]
        error = float((single - expected).norm())
        scale = max(float(expected.norm()), float(single.norm()))
        if not error <= _tolerance(outputs.dtype) * scale:
            raise ValueError(
                "loss_fn is not the batch mean of per-sample losses (checked on batch 0: |b| "
                "dL_b/d outputs[i] differs from the gradient of loss_fn(outputs[i:i+1], "
                "targets[i:i+1])): the empirical Fisher needs each sample's own loss. Use "
                "reduction='mean' without class weights, or a loss that averages per-sample "
                "terms"
            )


class FisherOperator(PerSampleOuterProducts):
    """Fisher information of the model's predictive distribution, averaged over ``data``.

    F = (1/N) sum_i E_{y ~ p(. | x_i)} g_i(y) g_i(y)^T, with g_i(y) the gradient of sample
    i's loss at label y, and p the distribution whose negative log-likelihood the loss is:
    Categorical(softmax(f)) for cross-entropy, Normal(f, (D/2) I) for the mean squared error
    over D output entries (module docstring). With this p, F equals the Gauss-Newton matrix
    exactly, for both losses (the "true" or type-2 Fisher; docs/fisher.md).

    ``mode="mc"`` (default) replaces the expectation by ``mc_samples`` labels per sample,
    y_{i,s} ~ p(. | x_i), drawn once when the operator is built (one forward pass over the
    data) from a generator seeded by ``seed``; the operator is then one fixed symmetric PSD
    matrix, F_MC = (1/N) sum_i (1/S) sum_s g_i(y_{i,s}) g_i(y_{i,s})^T, with E F_MC = F and
    entrywise variance O(1/(N S)). ``mode="exact"`` takes the expectation in closed form
    (diag(p) - p p^T for cross-entropy, (2/D) I for MSE). Neither touches the global RNG.

    ``model``, ``loss_fn``, ``data``, ``params``, ``dtype``, ``device``, ``unpack_batch``,
    ``check_determinism``, ``matmat_mode``, ``keep_graphs``, ``graph_memory`` and
    ``allow_tf32`` are those of :class:`~curvscope.operators.hessian.HessianOperator`.

    Args:
        loss: The likelihood ``loss_fn`` computes: "cross_entropy" (logits of shape (B, C),
            C >= 2) or "mse" (``F.mse_loss``, mean over all entries; outputs of any shape
            (B, ...)). Default: read from ``loss_fn`` (``F.cross_entropy``,
            ``nn.CrossEntropyLoss``, ``F.mse_loss``, ``nn.MSELoss``,
            ``curvscope.losses.mse_loss``, or a ``functools.partial`` of one); other losses
            must name it. Checked at construction: loss_fn's Hessian in the outputs on batch 0
            must be that of the named loss, mean-reduced, without class weights.
        mode: "mc" (sampled labels) or "exact" (the expectation over all labels).
        mc_samples: S, labels drawn per sample in "mc" mode (>= 1). Named so because
            ``num_samples`` is N, the samples of the data (an attribute of every operator).
        seed: Seed of the label draws ("mc"); the same seed gives the same labels and the
            same matrix, bit for bit.

    Attributes:
        loss: The loss kind, "cross_entropy" or "mse".
        mode, mc_samples, seed: As given.

    Shapes:
        ``matvec``: (n,) -> (n,); ``matmat``: (n, k) -> (n, k).

    Example:
        Softmax regression on two samples: with exact labels F is the Gauss-Newton matrix
        (1/N) sum_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T; at zero weights p_i = (1/2, 1/2),
        so the block of class 0's weights is (1/4) X^T X / N = diag(1/8, 1/2):

        >>> import torch
        >>> from torch import nn
        >>> from torch.nn import functional as F
        >>> from curvscope.operators import FisherOperator, GGNOperator
        >>> model = nn.Linear(2, 2, bias=False)
        >>> _ = nn.init.zeros_(model.weight)
        >>> data = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))]
        >>> Fx = FisherOperator(model, F.cross_entropy, data, mode="exact")
        >>> torch.allclose(Fx.to_dense(), GGNOperator(model, F.cross_entropy, data).to_dense())
        True
        >>> Fx.to_dense()[:2, :2].tolist()
        [[0.125, 0.0], [0.0, 0.5]]
        >>> Fmc = FisherOperator(model, F.cross_entropy, data, mc_samples=4, seed=0)
        >>> v = torch.ones(4, dtype=torch.float64)
        >>> torch.equal(Fmc @ v, Fmc @ v)
        True
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
        *,
        loss: LossKind | None = None,
        mode: FisherMode = "mc",
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        if mode not in ("mc", "exact"):
            raise ValueError(f"mode must be 'mc' (sampled labels) or 'exact', not {mode!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.loss: LossKind = infer_loss_kind(loss_fn) if loss is None else _check_kind(loss)
        if mode == "mc" and is_shuffling(data):
            raise ValueError(
                "FisherOperator(mode='mc') draws its labels once per batch position, and this "
                "DataLoader shuffles, so every product would pair the labels with other "
                "samples: pass a DataLoader with shuffle=False (or a list of batches), or use "
                "mode='exact'"
            )
        self.mode = mode
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            device=device,
            unpack_batch=unpack_batch,
            check_determinism=check_determinism,
            matmat_mode=matmat_mode,
            keep_graphs=keep_graphs,
            graph_memory=graph_memory,
            allow_tf32=allow_tf32,
        )
        self._draws: list[torch.Tensor] = []
        with preserved_rng(), torch.enable_grad(), ieee_float32(not self.allow_tf32):
            first = self.source.first()
            self._check_loss_kind(first, self.batch_outputs(first).detach())
            if mode == "mc":
                self._draw_labels()

    # ----- the predictive distribution -----------------------------------------------------

    def _probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        if outputs.ndim != 2 or outputs.shape[1] < 2:
            raise ValueError(
                "the Fisher of cross_entropy needs logits of shape (B, C) with C >= 2 classes, "
                f"got outputs of shape {tuple(outputs.shape)}"
            )
        return torch.softmax(outputs, dim=1)

    def _draw_labels(self) -> None:
        """Draw S labels per sample, batch after batch, from one seeded CPU generator.

        Cross-entropy keeps the class indices (B, S); MSE keeps the standard normal noise z
        (B, S, D) of y = f + sqrt(D/2) z.
        """
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * rank())
        S = self.mc_samples
        with torch.no_grad():
            for batch in self.source:
                outputs = self.batch_outputs(batch)
                size = batch.size
                if self.loss == "cross_entropy":
                    p = self._probabilities(outputs).to("cpu", torch.float64)
                    labels = torch.multinomial(p, S, replacement=True, generator=generator)
                    self._draws.append(labels.to(self.device))
                else:
                    z = torch.randn(
                        size, S, outputs[0].numel(), generator=generator, dtype=torch.float64
                    )
                    self._draws.append(z.to(self.device, self.dtype))

    def sampled_targets(self) -> list[torch.Tensor]:
        """The labels drawn in "mc" mode, one tensor per batch in data order.

        Cross-entropy: class indices of shape (B, S). MSE: targets of shape (B, S, *f_i.shape),
        y_{i,s} = f_i + sqrt(D/2) z_{i,s} (this costs a forward pass over the data).
        """
        if self.mode != "mc":
            raise ValueError("sampled_targets: mode='exact' draws no labels")
        if self.loss == "cross_entropy":
            return [labels.clone() for labels in self._draws]
        targets = []
        with preserved_rng(), torch.no_grad(), ieee_float32(not self.allow_tf32):
            for batch in self.source:
                outputs = self.batch_outputs(batch)
                noise = self._draw_of(batch).reshape(batch.size, self.mc_samples, -1)
                sigma = (outputs[0].numel() / 2.0) ** 0.5
                y = outputs.reshape(batch.size, 1, -1) + sigma * noise
                targets.append(y.reshape(batch.size, self.mc_samples, *outputs.shape[1:]))
        return targets

    def _draw_of(self, batch: Batch) -> torch.Tensor:
        if batch.index >= len(self._draws) or self._draws[batch.index].shape[0] != batch.size:
            raise ValueError(
                f"batch {batch.index} of {batch.size} samples has no labels drawn for it: the "
                "data must give the same batches on every pass as when the operator was built"
            )
        return self._draws[batch.index]

    # ----- Lambda per sample -------------------------------------------------------------

    def output_state(self, batch: Batch, outputs: torch.Tensor) -> torch.Tensor:
        """What Lambda_i needs of the batch.

        "exact": :func:`exact_state`; "mc": the factors (B, S, D) of Lambda_i = (1/S) sum_s
        a_{i,s} a_{i,s}^T.
        """
        if self.mode == "exact":
            return exact_state(self.loss, outputs)
        D, S = outputs[0].numel(), self.mc_samples
        draw = self._draw_of(batch)
        if self.loss == "cross_entropy":
            p = self._probabilities(outputs)  # a(y) = p - e_y
            factors = p[:, None, :].repeat(1, S, 1)
            factors.scatter_add_(2, draw[:, :, None], torch.full_like(factors[..., :1], -1.0))
        else:  # a(y) = (2/D)(f - y) = -sqrt(2/D) z
            factors = draw.to(outputs.dtype) * (-((2.0 / D) ** 0.5))
        return factors.mul_(S**-0.5)

    def output_products(self, state: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Lambda_i W[:, i]; W (k, B, D)."""
        if self.mode == "mc":
            return apply_factors(state, W)
        return exact_products(self.loss, state, W)

    def _check_loss_kind(self, batch: Batch, outputs: torch.Tensor) -> None:
        """Refuse a loss_fn whose Hessian in the outputs is not that of ``self.loss``.

        Compares H_L U by autograd through ``loss_fn`` with E_y a a^T U / B for a random U,
        on batch 0, to sqrt(eps) of the dtype (a wrong kind, reduction or class weighting is
        off by O(1)).
        """
        if self.loss == "cross_entropy":
            self._probabilities(outputs)  # the shape check, with its message
        with torch.enable_grad():
            leaf = outputs.detach().requires_grad_(True)
            loss = self.check_loss(self.loss_fn(leaf, batch.targets), batch)
            (gradient,) = torch.autograd.grad(loss, leaf, create_graph=True)
            generator = torch.Generator().manual_seed(0)
            U = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
            U = U.to(outputs)
            if gradient.requires_grad:
                (exact,) = torch.autograd.grad(
                    gradient, leaf, grad_outputs=U, allow_unused=True, materialize_grads=True
                )
            else:  # the loss is linear in the outputs
                exact = torch.zeros_like(U)
        size = batch.size
        state = exact_state(self.loss, outputs)
        expected = exact_products(self.loss, state, U.reshape(1, size, -1))[0] / size
        error = float((exact.reshape(size, -1) - expected).norm())
        if not error <= _tolerance(outputs.dtype) * float(expected.norm()):
            raise ValueError(
                f"loss_fn's Hessian in the outputs is not that of mean-reduced {self.loss} "
                "(checked on batch 0), so the Fisher of its likelihood is not defined by it: "
                "pass loss='cross_entropy' or loss='mse' for what loss_fn computes, with "
                "reduction='mean' and no class weights (use EmpiricalFisherOperator for other "
                "losses)"
            )


def exact_state(loss: LossKind, outputs: torch.Tensor) -> torch.Tensor:
    """softmax(f) (B, C) for cross-entropy; the scalar 2/D for MSE over D entries per sample."""
    if loss == "cross_entropy":
        return torch.softmax(outputs, dim=1)
    return torch.tensor(2.0 / outputs[0].numel(), dtype=outputs.dtype, device=outputs.device)


def exact_products(loss: LossKind, state: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """E_y a(y) a(y)^T W[:, i] per sample: (diag(p) - p p^T) w, or (2/D) w; W (k, B, D)."""
    if loss == "cross_entropy":
        return state * W - state * (state * W).sum(dim=2, keepdim=True)
    return W * state


def _check_kind(loss: Any) -> LossKind:
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', not {loss!r}")
    return loss


def infer_loss_kind(loss_fn: Any) -> LossKind:
    """The likelihood of a known loss function: "cross_entropy" or "mse".

    Knows ``F.cross_entropy``, ``nn.CrossEntropyLoss``, ``F.mse_loss``, ``nn.MSELoss``,
    :func:`curvscope.losses.mse_loss` and ``functools.partial`` objects of them; raises a
    ValueError asking for ``loss=`` otherwise.
    """
    function = loss_fn
    while isinstance(function, functools.partial):
        function = function.func
    if function is F.cross_entropy or isinstance(function, nn.CrossEntropyLoss):
        return "cross_entropy"
    if function in (F.mse_loss, mse_loss) or isinstance(function, nn.MSELoss):
        return "mse"
    name = getattr(function, "__name__", type(function).__name__)
    raise ValueError(
        f"cannot tell which likelihood loss_fn ({name}) is the negative log of: pass "
        "loss='cross_entropy' (logits, integer or probability targets) or loss='mse' "
        "(mean squared error over all entries); other losses have no Fisher here (use "
        "EmpiricalFisherOperator)"
    )


def _tolerance(dtype: torch.dtype) -> float:
    """sqrt(eps) of ``dtype``: 1.5e-8 in float64, 3.5e-4 in float32."""
    return float(torch.finfo(dtype).eps) ** 0.5


def _sample(obj: Any, i: int) -> Any:
    """Sample i of a (nested) batch of targets, keeping the batch dimension (size 1)."""
    if isinstance(obj, torch.Tensor):
        return obj[i : i + 1] if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        return {key: _sample(value, i) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_sample(item, i) for item in obj)
    return obj
