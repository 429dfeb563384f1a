"""Full float32 precision during curvature products.

On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default (10-bit
mantissa: ``torch.backends.cudnn.conv.fp32_precision == "tf32"``), and users often switch
matmuls to TF32 or, on CPUs with AMX, to bf16. A Hessian product in such reduced precision is
off by ~1e-3 relative, silently, which spoils Lanczos' quadrature and every residual check.
:func:`ieee_float32` sets every float32 backend to full IEEE precision for the duration of a
product and restores the user's settings afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _precision_switches() -> list[Any]:
    """Backend objects with an ``fp32_precision`` setting (torch >= 2.9), else []."""
    backends = torch.backends
    found = []
    for parent, names in (
        (getattr(backends, "cuda", None), ("matmul",)),
        (getattr(backends, "cudnn", None), ("conv", "rnn")),
        (getattr(backends, "mkldnn", None), ("matmul", "conv", "rnn")),
    ):
        for name in names:
            switch = getattr(parent, name, None)
            if switch is not None and hasattr(switch, "fp32_precision"):
                found.append(switch)
    return found


@contextmanager
def ieee_float32(enabled: bool = True) -> Iterator[None]:
    """Run the block with every float32 backend in full precision ("ieee"); restores after.

    Args:
        enabled: False makes this a no-op (the user's TF32/bf16 settings apply).
    """
    if not enabled:
        yield
        return
    switches = _precision_switches()
    if switches:
        saved = [switch.fp32_precision for switch in switches]
        try:
            for switch in switches:
                switch.fp32_precision = "ieee"
            yield
        finally:
            for switch, value in zip(switches, saved, strict=True):
                switch.fp32_precision = value
        return
    # Older torch: the legacy TF32 flags.
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy
