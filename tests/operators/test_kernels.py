"""Products choose kernels that autograd can differentiate twice, and give the settings back.

Attention through ``F.scaled_dot_product_attention`` picks a CPU flash kernel whose backward
has no derivative; the operators must run it on the MATH backend by themselves.
"""

import pytest
import torch
import torch.nn.functional as F
from cases import dense_hessian, rel_err
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope import HessianOperator
from curvscope.operators import GGNOperator, ResidualOperator
from curvscope.operators.kernels import twice_differentiable_kernels


def sdpa_switches() -> tuple[bool, ...]:
    backends = torch.backends.cuda
    return (
        backends.flash_sdp_enabled(),
        backends.mem_efficient_sdp_enabled(),
        backends.math_sdp_enabled(),
        backends.cudnn_sdp_enabled(),
    )


def rnn_switches() -> tuple[bool, bool]:
    return torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.seen: list[tuple[bool, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sdpa_switches() + rnn_switches())
        return self.head(self.layer(x).mean(dim=1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.seen: list[tuple[bool, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sdpa_switches() + rnn_switches())
        return self.head(self.rnn(x)[0][:, -1])


def attention_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 5, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
        for _ in range(2)
    ]


def test_the_fused_cpu_attention_kernel_has_no_double_backward():
    """Guards the premise: without the switch, the default kernel fails a Hessian product
    (if a future torch implements it, this test says the switch is no longer needed)."""
    torch.manual_seed(0)
    model = Encoder().double()
    x, y = attention_data()[0]
    loss = F.cross_entropy(model(x.double()), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), list(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_products_equal_the_dense_math_backend_hessian(dtype):
    torch.manual_seed(0)
    model = Encoder()
    data = attention_data()
    with sdpa_kernel(SDPBackend.MATH):
        H = dense_hessian(model, F.cross_entropy, data)
    user = sdpa_switches()
    op = HessianOperator(model, F.cross_entropy, data, dtype=dtype)
    V = torch.randn(
        op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    got = op.matmat(V.to(dtype)).to(torch.float64)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(got, H @ V) <= tolerance
    assert sdpa_switches() == user
    # every forward of the products saw MATH only, and cuDNN/oneDNN left alone (no RNN here)
    assert model.seen and all(seen[:4] == (False, False, True, False) for seen in model.seen)
    assert all(seen[4:] == rnn_switches() for seen in model.seen)


def test_ggn_and_residual_of_attention_add_up_to_the_hessian():
    torch.manual_seed(0)
    model = Encoder()
    data = attention_data()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    H = HessianOperator(model, F.cross_entropy, data).matmat(V)
    G = GGNOperator(model, F.cross_entropy, data).matmat(V)
    R = ResidualOperator(model, F.cross_entropy, data).matmat(V)
    assert rel_err(G + R, H) <= 1e-10


def test_the_users_attention_choice_is_restored_also_when_the_forward_raises():
    before = sdpa_switches()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        user = sdpa_switches()
        with pytest.raises(KeyError), twice_differentiable_kernels(recurrent=True):
            assert sdpa_switches() == (False, False, True, False)
            assert rnn_switches() == (False, False)
            raise KeyError("boom")
        assert sdpa_switches() == user
    assert sdpa_switches() == before
    assert rnn_switches() == (torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recurrent_models_run_without_cudnn_and_onednn_and_restore_them(dtype):
    torch.manual_seed(0)
    model = Recurrent()
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(5, 6, 3, generator=generator), torch.tensor([0, 1, 2, 0, 1]))]
    H = dense_hessian(model, F.cross_entropy, data)
    user = rnn_switches()
    op = HessianOperator(model, F.cross_entropy, data, dtype=dtype)
    V = torch.randn(op.num_params, 2, dtype=torch.float64, generator=generator)
    got = op.matmat(V.to(dtype)).to(torch.float64)
    assert rel_err(got, H @ V) <= (1e-10 if dtype == torch.float64 else 1e-4)
    assert rnn_switches() == user
    assert model.seen and all(seen[4:] == (False, False) for seen in model.seen)


def test_recurrent_models_share_one_vmapped_backward_on_the_cpu():
    """Their double backward is a chain of tiny kernels: "auto" vmaps the k vectors on the CPU
    for them (and loops for other models), with the loop's numbers."""
    torch.manual_seed(0)
    model = Recurrent()
    generator = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 6, 3, generator=generator), torch.tensor([0, 1, 2, 0, 1]))]
    auto = HessianOperator(model, F.cross_entropy, data)
    loop = HessianOperator(model, F.cross_entropy, data, matmat_mode="loop")
    assert auto.matmat_mode == "auto" and loop.matmat_mode == "loop"
    V = torch.randn(auto.num_params, 4, dtype=torch.float64, generator=generator)
    assert rel_err(auto.matmat(V), loop.matmat(V)) <= 1e-13
    assert auto.matmat_mode == "auto"  # the vmapped pass worked: no fallback to the loop
    assert HessianOperator(Encoder(), F.cross_entropy, attention_data()).matmat_mode == "loop"


def weight_norm_model(old_api: bool) -> nn.Module:
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    if old_api:
        with pytest.warns(FutureWarning):
            return nn.Sequential(
                torch.nn.utils.weight_norm(nn.Linear(4, 5)),
                nn.Tanh(),
                torch.nn.utils.weight_norm(nn.Linear(5, 3)),
            )
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(4, 5)),
        nn.Tanh(),
        parametrizations.weight_norm(nn.Linear(5, 3)),
    )


def test_the_fused_weight_norm_kernel_has_a_wrong_second_derivative():
    """Guards the premise of the explicit weight norm (if a future torch fixes the kernel,
    this test says the replacement is no longer needed)."""
    v = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(5, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    fused = lambda v, g: torch._weight_norm(v, g, 0)  # noqa: E731
    explicit = lambda v, g: v * (g / torch.norm_except_dim(v, 2, 0))  # noqa: E731
    assert torch.allclose(fused(v, g), explicit(v, g), rtol=1e-14, atol=0)
    assert torch.autograd.gradgradcheck(explicit, (v, g))
    assert not torch.autograd.gradgradcheck(fused, (v, g), raise_exception=False)


@pytest.mark.parametrize("old_api", [False, True], ids=["parametrizations", "hook"])
def test_weight_norm_hessians_are_exact_and_symmetric(old_api):
    model = weight_norm_model(old_api)
    generator = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, 4, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))]
    op = HessianOperator(model, F.cross_entropy, data)
    M = op.matmat(torch.eye(op.num_params, dtype=torch.float64))
    assert rel_err(M, M.T) <= 1e-12
    # reference: the same network with weight norm written out, through plain double backward
    names = op.param_names
    params = [p.detach().double().clone().requires_grad_(True) for p in op.function.param_list()]
    by_name = dict(zip(names, params, strict=True))

    def layer(x, prefix):
        if old_api:
            v, g = by_name[f"{prefix}.weight_v"], by_name[f"{prefix}.weight_g"]
        else:
            v = by_name[f"{prefix}.parametrizations.weight.original1"]
            g = by_name[f"{prefix}.parametrizations.weight.original0"]
        return F.linear(x, v * (g / torch.norm_except_dim(v, 2, 0)), by_name[f"{prefix}.bias"])

    x, y = data[0]
    loss = F.cross_entropy(layer(torch.tanh(layer(x.double(), "0")), "2"), y)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    H = torch.stack(
        [
            torch.cat(
                [r.reshape(-1) for r in torch.autograd.grad(grads[i], params, retain_graph=True)]
            )
            for i in range(op.num_params)
        ]
    )
    assert rel_err(M, H) <= 1e-12
    assert (
        op.function.weight_norm
        and not HessianOperator(Encoder(), F.cross_entropy, attention_data()).function.weight_norm
    )
