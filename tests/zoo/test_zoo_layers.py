"""Model zoo, plain layers: MLP, CNN with BatchNorm (train and eval), LayerNorm, GroupNorm,
weight_norm parametrizations, nn.Embedding, and heads the loss never uses.

Each case's products are checked against a plain double-backward reference in float64
(relative error <= 1e-9) and against central differences of the gradient, with the model and
global state untouched (:mod:`zoo_check`); the smallest ones also as dense matrices.

Weight norm: on torch 2.13 the fused kernel behind ``parametrizations.weight_norm``
(``torch._weight_norm``, chosen for dim 0) has a wrong second derivative: its double backward
drops the derivative of the saved norms (``torch.autograd.gradgradcheck`` fails), so products
through it are wrong by ~40% and not even symmetric. The reference evaluates weight norm in
plain operations (:func:`zoo_models.explicit_weight_norm`); curvscope's operators evaluate
``torch._weight_norm`` by its formula during products (:mod:`curvscope.operators.kernels`).
"""

from __future__ import annotations

import pytest
import torch
import zoo_models as zm
from cases import dense_hessian, rel_err
from zoo_check import check_products, reference_hvp

from curvscope import HessianOperator

KEEP = pytest.mark.parametrize("keep_graphs", [True, False], ids=["kept", "rebuilt"])

BUILDERS = {
    "mlp": zm.mlp,
    "cnn_bn_train": lambda: zm.cnn_bn(train=True),
    "cnn_bn_eval": lambda: zm.cnn_bn(train=False),
    "layernorm_mlp": zm.layernorm_mlp,
    "groupnorm_cnn": zm.groupnorm_cnn,
    "weight_norm_mlp": zm.weight_norm_mlp,
    "embedding": zm.embedding_bag,
    "unused_head": zm.unused_head,
}


@KEEP
@pytest.mark.parametrize("name", list(BUILDERS))
def test_products_match_double_backward(name: str, keep_graphs: bool) -> None:
    check_products(BUILDERS[name](), keep_graphs=keep_graphs)


def dense_of(op: HessianOperator) -> torch.Tensor:
    """The operator's dense matrix, one data pass for all n columns."""
    return op.matmat(torch.eye(op.num_params, dtype=torch.float64))


def indices(op: HessianOperator, prefixes: tuple[str, ...]) -> torch.Tensor:
    """Positions in the flat vector of the parameters whose names start with ``prefixes``."""
    marks = {
        name: torch.full(part.shape, name.startswith(prefixes), dtype=torch.bool)
        for name, part in op.unflatten(torch.zeros(op.num_params)).items()
    }
    return torch.cat([marks[name].reshape(-1) for name in op.param_names]).nonzero().squeeze(1)


@pytest.mark.parametrize("name", ["mlp", "layernorm_mlp"])
def test_dense_hessian_matches(name: str) -> None:
    case = BUILDERS[name]()
    H = dense_of(HessianOperator(case.model, case.loss_fn, case.batches))
    assert rel_err(H, dense_hessian(case.model, case.loss_fn, case.batches)) <= 1e-9
    assert rel_err(H, H.T) <= 1e-12


def test_weight_norm_dense_hessian_is_exact_and_symmetric() -> None:
    case = zm.weight_norm_mlp()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    H = dense_of(op)
    assert rel_err(H, H.T) <= 1e-12, "the Hessian is not symmetric"
    assert rel_err(H, reference_hvp(case, torch.eye(op.num_params, dtype=torch.float64))) <= 1e-9


def test_weight_norm_parameters_are_the_parametrization_originals() -> None:
    case = zm.weight_norm_mlp()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    assert op.param_names == [
        "0.bias",
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
        "2.bias",
        "2.parametrizations.weight.original0",
        "2.parametrizations.weight.original1",
    ]


def test_heads_the_loss_never_uses_have_zero_rows_and_columns() -> None:
    case = zm.unused_head()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    H = dense_of(op)
    unused = indices(op, ("aux.", "spare."))
    assert unused.numel() == 2 * (5 * 2 + 2)  # two Linear(5, 2) heads
    assert torch.count_nonzero(H[unused]) == 0
    assert torch.count_nonzero(H[:, unused]) == 0
    used = indices(op, ("trunk.", "head."))
    assert torch.count_nonzero(H[used][:, used]) > 0
    # cases.dense_hessian refuses parameters that the loss does not use: the HVP reference.
    assert rel_err(H, reference_hvp(case, torch.eye(op.num_params, dtype=torch.float64))) <= 1e-9


def test_embedding_padding_row_has_zero_rows_and_columns() -> None:
    """Token 0 is padding_idx and left out of the pooling: its row never reaches the loss."""
    case = zm.embedding_bag()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    H = dense_of(op)
    dim = case.model.embedding.embedding_dim
    assert op.param_names[0] == "embedding.weight"
    assert torch.count_nonzero(H[:dim]) == 0  # row 0 of the table: flat positions 0..dim-1
    assert torch.count_nonzero(H[:, :dim]) == 0
    assert rel_err(H, dense_hessian(case.model, case.loss_fn, case.batches)) <= 1e-9
