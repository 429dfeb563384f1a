"""Kernels that can be differentiated twice, chosen for the forward passes of curvature products.

Curvature products differentiate through a batch's gradient graph (a double backward), and
some fused kernels that PyTorch picks by default have no derivative of their backward:

* attention through ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer``, Hugging Face models): the flash kernels on CPU and CUDA, the
  memory-efficient and cuDNN kernels on CUDA (``derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``);
* recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) through cuDNN on CUDA (``double
  backward is not supported for cuDNN RNNs``) and through oneDNN (mkldnn) on the CPU.

:func:`twice_differentiable_kernels` runs a block with attention on the MATH backend (the
composite implementation, which autograd differentiates any number of times) and, when the
model has recurrent layers, with cuDNN and oneDNN off, so that their composite implementations
run. The user's settings are restored on exit, also when the block raises. The switch applies
to the forward pass only: autograd records the kernel chosen there, and the backward passes of
that graph follow it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def has_recurrent_layers(model: nn.Module) -> bool:
    """True when ``model`` contains an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


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
def twice_differentiable_kernels(recurrent: bool = False) -> Iterator[None]:
    """Run the block with kernels whose backward can be differentiated again.

    Args:
        recurrent: Also switch cuDNN and oneDNN off (for models with recurrent layers; other
            models keep them, which convolutions need for speed).
    """
    with ExitStack() as stack:
        stack.enter_context(math_attention())
        if recurrent:
            stack.enter_context(composite_rnn())
        yield
