"""Kernels that can be differentiated twice, chosen for the forward passes of curvature products.

Curvature products differentiate through a batch's gradient graph (a double backward), and
some fused kernels that PyTorch picks by default have no derivative of their backward:

* attention through ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer``, Hugging Face models): the flash kernels on CPU and CUDA, the
  memory-efficient and cuDNN kernels on CUDA (``derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``);
* recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) through cuDNN on CUDA (``double
  backward is not supported for cuDNN RNNs``) and through oneDNN (mkldnn) on the CPU;
* weight normalisation (``torch.nn.utils.parametrizations.weight_norm`` and the older
  ``torch.nn.utils.weight_norm``) through the fused ``torch._weight_norm``, whose double
  backward is *wrong* on torch 2.13, silently (``gradgradcheck`` fails; a Hessian product was
  40% off and not symmetric): it is evaluated as ``v * (g / norm_except_dim(v, 2, dim))``.

:func:`twice_differentiable_kernels` runs a block with attention on the MATH backend (the
composite implementation, which autograd differentiates any number of times) and, when the
model has recurrent layers, with cuDNN and oneDNN off, so that their composite implementations
run, and, when it has weight normalisation, with ``torch._weight_norm`` replaced by its plain
formula. The user's settings are restored on exit, also when the block raises. The switch applies
to the forward pass only: autograd records the kernel chosen there, and the backward passes of
that graph follow it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def has_recurrent_layers(model: nn.Module) -> bool:
    """True when ``model`` contains an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


def has_weight_norm(model: nn.Module) -> bool:
    """True when ``model`` uses weight normalisation, new (parametrization) or old (hook)."""
    # The modules (``torch.nn.utils.weight_norm`` is also the name of a function there).
    parametrizations = importlib.import_module("torch.nn.utils.parametrizations")
    weight_norm = importlib.import_module("torch.nn.utils.weight_norm")
    # Private class names of torch (2.2-2.13): where a release renames them, weight norm is
    # not detected and its products go through the fused kernel as before.
    kinds = tuple(
        kind
        for kind in (
            getattr(parametrizations, "_WeightNorm", None),
            getattr(weight_norm, "WeightNorm", None),
        )
        if isinstance(kind, type)
    )
    if not kinds:
        return False
    for module in model.modules():
        if isinstance(module, kinds):  # parametrizations live in the module tree
            return True
        if any(isinstance(hook, kinds) for hook in module._forward_pre_hooks.values()):
            return True
    return False


class ExplicitWeightNorm(TorchFunctionMode):
    """Evaluates ``torch._weight_norm(v, g, dim)`` by its formula.

    That is ``v * (g / norm_except_dim(v, 2, dim))``, the same function (to rounding) with a correct
    second derivative.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


@contextmanager
def math_attention() -> Iterator[None]:
    """Scaled dot-product attention on the MATH backend only; the user's choice restored."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no fused CPU attention to avoid
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def composite_rnn() -> Iterator[None]:
    """cuDNN and oneDNN (mkldnn) off, so recurrent layers run their composite kernels.

    Only the two ``enabled`` switches change (``torch.backends.*.flags`` would also reset the
    float32 precision settings that :mod:`~curvscope.operators.precision` manages).
    """
    backends = (torch.backends.cudnn, torch.backends.mkldnn)
    saved = [backend.enabled for backend in backends]
    try:
        for backend in backends:
            backend.enabled = False
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.enabled = value


@contextmanager
def twice_differentiable_kernels(
    recurrent: bool = False, weight_norm: bool = False
) -> Iterator[None]:
    """Run the block with kernels whose backward can be differentiated (correctly) again.

    Args:
        recurrent: Also switch cuDNN and oneDNN off (for models with recurrent layers; other
            models keep them, which convolutions need for speed).
        weight_norm: Also evaluate ``torch._weight_norm`` by its formula (a function mode sees
            every torch call of the block, so only models with weight norm pay for it).
    """
    with ExitStack() as stack:
        stack.enter_context(math_attention())
        if recurrent:
            stack.enter_context(composite_rnn())
        if weight_norm:
            stack.enter_context(ExplicitWeightNorm())
        yield
