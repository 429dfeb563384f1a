"""Checks of the model-zoo suite: curvscope's products against an independent reference, and
the model and global state left as they were.

The reference :func:`reference_hvp` uses nothing from curvscope and no ``torch.func``: a
float64 deep copy of the model (its own train/eval mode), the flat mean loss over the whole
data (each batch's mean loss, from one forward of that batch, weighted by |b| / N) as a function
of the parameters in ``model.named_parameters()`` order (tied parameters once), its gradient
with ``torch.autograd.grad(create_graph=True)``, then a second ``torch.autograd.grad`` of
<gradient, v> for each vector v. Its forward runs with attention on the MATH backend, whose
backward autograd can differentiate again (the fused CPU kernel's cannot).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from cases import _call, _pair, _to_float64, rel_err
from operators.test_untouched_and_errors import assert_same, snapshot
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo_models import ZooCase

from curvscope import HessianOperator

#: Tolerance of products against central differences with eps = 1e-6 (measured: <= 1e-8).
FD_RTOL = 1e-6


def backend_state() -> dict[str, Any]:
    """Global kernel settings a product may switch for a while and must put back."""
    cuda = torch.backends.cuda
    state: dict[str, Any] = {
        "sdp_enabled": (
            cuda.flash_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled(),
        ),
        "mkldnn": torch.backends.mkldnn.enabled,
        "cudnn": torch.backends.cudnn.enabled,
        "mkldnn_fp32_precision": getattr(
            getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None
        ),
    }
    priority = getattr(torch._C, "_get_sdp_priority_order", None)
    if priority is not None:
        state["sdp_priority"] = list(priority())
    return state


def untouched_state(model: nn.Module) -> dict[str, Any]:
    """Everything an analysis could disturb: the model (parameters, buffers, grads,
    requires_grad, modes), the global RNGs, grad mode, and the backend settings."""
    return {**snapshot(model), "backends": backend_state()}


def assert_untouched(before: dict[str, Any], after: dict[str, Any], where: str = "") -> None:
    """Two :func:`untouched_state` snapshots are equal; the error names ``where``."""
    try:
        assert_same(before, after)
        assert before["backends"] == after["backends"], "a backend setting was not restored"
    except AssertionError as error:
        raise AssertionError(f"{where}: {error}") from error


def reference_copy(case: ZooCase) -> tuple[nn.Module, list[torch.Tensor]]:
    """A float64 deep copy of the model (each submodule in its own mode, rewritten by
    ``case.exact_reference`` where torch's own second derivative is wrong) and its trainable
    parameters in ``named_parameters()`` order (tied parameters once)."""
    ref = copy.deepcopy(case.model).double()
    if case.exact_reference is not None:
        case.exact_reference(ref)
    return ref, [p for _, p in ref.named_parameters() if p.requires_grad]


def mean_loss(case: ZooCase, ref: nn.Module) -> torch.Tensor:
    """sum_b (|b| / N) * loss_b, each batch through one forward of ``ref`` (MATH attention)."""
    unpack = case.unpack or _pair
    sizes = [int(unpack(batch)[1].shape[0]) for batch in case.batches]
    total = sum(sizes)
    loss = torch.zeros((), dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        for batch, size in zip(case.batches, sizes, strict=True):
            inputs, targets = unpack(batch)
            outputs = _call(ref, _to_float64(inputs))
            loss = loss + (size / total) * case.loss_fn(outputs, _to_float64(targets))
    return loss


def _flat_gradient(
    loss: torch.Tensor, leaves: list[torch.Tensor], create_graph: bool
) -> torch.Tensor:
    grads = torch.autograd.grad(
        loss, leaves, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return torch.cat([g.reshape(-1) for g in grads])


def reference_hvp(case: ZooCase, V: torch.Tensor) -> torch.Tensor:
    """H V (n, k) in float64 by plain double backward over the whole data (module docstring)."""
    ref, leaves = reference_copy(case)
    out = torch.zeros(V.shape, dtype=torch.float64)
    with torch.enable_grad():
        flat = _flat_gradient(mean_loss(case, ref), leaves, create_graph=True)
        if not flat.requires_grad:
            return out  # the loss is linear in the parameters
        for j in range(V.shape[1]):
            rows = torch.autograd.grad(
                flat @ V[:, j].double(),
                leaves,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            out[:, j] = torch.cat([r.reshape(-1) for r in rows])
    return out


def finite_difference_hvp(case: ZooCase, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps) in float64, from first derivatives
    only: independent of every second-derivative formula inside torch. Error ~eps^2 for a
    loss that is smooth near theta (no ReLU kink within eps |v|)."""
    ref, leaves = reference_copy(case)
    theta = [p.detach().clone() for p in leaves]
    steps = torch.split(v.double(), [p.numel() for p in leaves])
    out = torch.zeros(v.shape, dtype=torch.float64)
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, start, step in zip(leaves, theta, steps, strict=True):
                p.copy_(start + sign * eps * step.reshape(p.shape))
        with torch.enable_grad():
            out += sign * _flat_gradient(mean_loss(case, ref), leaves, create_graph=False)
    return out / (2 * eps)


def check_products(
    case: ZooCase,
    keep_graphs: bool | str = True,
    dtype: torch.dtype | None = None,
    rtol: float = 1e-9,
    num_vectors: int = 2,
    block: int = 3,
    seed: int = 0,
) -> HessianOperator:
    """Build the operator, run ``num_vectors`` products ``H @ v`` and one ``H.matmat`` of
    ``block`` columns, and check them against :func:`reference_hvp` and the model untouched;
    for a smooth case in float64, also the first product against
    :func:`finite_difference_hvp` (relative error <= ``FD_RTOL``).

    The first parameter gets a ``.grad`` first, so that the check also sees it unchanged.

    Returns:
        The operator (for further checks).
    """
    model = case.model
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.5)
    before = untouched_state(model)
    op = HessianOperator(
        model,
        case.loss_fn,
        case.batches,
        dtype=dtype,
        unpack_batch=case.unpack,
        keep_graphs=keep_graphs,
    )
    assert_untouched(before, untouched_state(model), "after building the operator")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert op.param_names == names, "flat order is not model.named_parameters() order"
    assert op.num_params == case.num_params, "tied parameters must be counted once"

    generator = torch.Generator().manual_seed(seed)
    V = torch.randn(op.num_params, num_vectors + block, generator=generator, dtype=torch.float64)
    got = torch.empty_like(V)
    for j in range(num_vectors):
        got[:, j] = op @ V[:, j].to(op.dtype)
    got[:, num_vectors:] = op.matmat(V[:, num_vectors:].to(op.dtype))
    assert_untouched(before, untouched_state(model), "after the products")

    expected = reference_hvp(case, V)
    for j in range(V.shape[1]):
        kind = f"H @ v[{j}]" if j < num_vectors else f"matmat column {j - num_vectors}"
        error = rel_err(got[:, j], expected[:, j])
        assert error <= rtol, f"{case.name}: {kind}: relative error {error:.2e} > {rtol:.0e}"
    if case.smooth and op.dtype == torch.float64:
        error = rel_err(got[:, 0], finite_difference_hvp(case, V[:, 0]))
        assert error <= FD_RTOL, (
            f"{case.name}: H @ v differs from central differences of the gradient by "
            f"{error:.2e} (> {FD_RTOL:.0e}): a wrong second derivative somewhere"
        )
    return op
