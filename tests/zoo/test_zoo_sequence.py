"""Model zoo, sequences: nn.LSTM and nn.GRU, nn.TransformerEncoder and nn.MultiheadAttention.

Attention goes through ``F.scaled_dot_product_attention``, whose fused CPU kernel has no double
backward (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``): products must work without the user doing anything, and leave the user's
attention backend setting as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo_models as zm
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo_check import backend_state, check_products

from curvscope import HessianOperator

KEEP = pytest.mark.parametrize("keep_graphs", [True, False], ids=["kept", "rebuilt"])

BUILDERS = {
    "lstm": lambda: zm.recurrent("lstm"),
    "gru": lambda: zm.recurrent("gru"),
    "transformer_encoder_train": lambda: zm.transformer_encoder(train=True),
    "transformer_encoder_eval": lambda: zm.transformer_encoder(train=False),
    "multihead_attention": zm.multihead_attention,
}


@KEEP
@pytest.mark.parametrize("name", list(BUILDERS))
def test_products_match_double_backward(name: str, keep_graphs: bool) -> None:
    check_products(BUILDERS[name](), keep_graphs=keep_graphs)


@KEEP
@pytest.mark.parametrize("name", ["lstm", "transformer_encoder_train", "multihead_attention"])
def test_float32_products(name: str, keep_graphs: bool) -> None:
    """Float32 products of a float32 model, against the float64 reference."""
    check_products(BUILDERS[name](), keep_graphs=keep_graphs, dtype=torch.float32, rtol=1e-4)


def attention_kernel(dtype: torch.dtype) -> str:
    """Name of the autograd node that ``F.scaled_dot_product_attention`` records now."""
    q = torch.ones(1, 1, 4, 8, dtype=dtype, requires_grad=True)
    return F.scaled_dot_product_attention(q, q, q).grad_fn.name()


SETTINGS = {
    "flash only": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
    "math last": lambda: sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        set_priority=True,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_user_attention_backend_setting_is_unchanged(setting: str, dtype: torch.dtype) -> None:
    """Inside the user's ``sdpa_kernel`` block (the flash kernel, which products cannot use),
    products work, and the user's setting (enabled backends, priority order) is in force again
    after building the operator and after every product; so is the default outside."""
    default = backend_state()
    case = zm.transformer_encoder()
    with SETTINGS[setting]():
        users = backend_state()
        assert users != default
        assert "Flash" in attention_kernel(dtype)
        op = HessianOperator(
            case.model, case.loss_fn, case.batches, unpack_batch=case.unpack, dtype=dtype
        )
        assert backend_state() == users
        v = torch.ones(op.num_params, dtype=dtype)
        op @ v
        assert backend_state() == users
        op.matmat(torch.ones(op.num_params, 2, dtype=dtype))
        assert backend_state() == users
        assert "Flash" in attention_kernel(dtype)
    assert backend_state() == default


def test_attention_backend_restored_when_a_product_raises() -> None:
    """A loss that fails inside a product still leaves the user's setting in force."""
    case = zm.multihead_attention()
    calls = {"n": 0}

    def failing_on_second_batch(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3:  # construction evaluates batch 0 twice; the product fails later
            raise RuntimeError("loss failed")
        return F.cross_entropy(outputs, targets)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        users = backend_state()
        op = HessianOperator(
            case.model,
            failing_on_second_batch,
            case.batches,
            unpack_batch=case.unpack,
            keep_graphs=False,
        )
        with pytest.raises(RuntimeError, match="loss failed"):
            op @ torch.ones(op.num_params, dtype=torch.float64)
        assert backend_state() == users
