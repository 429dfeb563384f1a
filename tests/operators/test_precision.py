"""Products run with every float32 backend in full IEEE precision, and settings come back."""

import torch
from cases import make_case

from curvscope import HessianOperator
from curvscope.operators.precision import _precision_switches, ieee_float32


def test_products_run_in_ieee_float32_and_restore_the_users_settings():
    case = make_case("tanh_mlp_ce")
    seen: list[list[str]] = []

    def recording_loss(outputs, targets):
        seen.append([switch.fp32_precision for switch in _precision_switches()])
        return case.loss_fn(outputs, targets)

    switches = _precision_switches()
    assert switches, "torch 2.13 has fp32_precision settings"
    conv = torch.backends.cudnn.conv
    before = [switch.fp32_precision for switch in switches]
    old_conv = conv.fp32_precision
    try:
        conv.fp32_precision = "tf32"  # PyTorch's default for cuDNN convolutions
        user = [switch.fp32_precision for switch in switches]
        op = HessianOperator(case.model, recording_loss, case.batches, keep_graphs=False)
        seen.clear()
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
        assert seen and all(all(p == "ieee" for p in during) for during in seen)
        assert [switch.fp32_precision for switch in switches] == user

        lax = HessianOperator(
            case.model, recording_loss, case.batches, keep_graphs=False, allow_tf32=True
        )
        seen.clear()
        lax.matvec(torch.ones(lax.num_params, dtype=torch.float64))
        assert seen and all(during == user for during in seen)
        assert "tf32" in user
    finally:
        conv.fp32_precision = old_conv
    assert [switch.fp32_precision for switch in switches] == before


def test_settings_are_restored_when_the_block_raises():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    try:
        with ieee_float32():
            assert conv.fp32_precision == "ieee"
            raise KeyError("boom")
    except KeyError:
        pass
    assert conv.fp32_precision == before
    with ieee_float32(enabled=False):
        assert conv.fp32_precision == before
