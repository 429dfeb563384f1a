"""HessianOperator against dense float64 Hessians built column by column (tests/cases.py).

Tolerances: in float64 a product of a ~100-parameter Hessian is a sum of a few hundred
rounded terms, so matrix-free and dense results agree to ~1e-15 relative (measured <= 6e-16);
1e-10 leaves five orders of margin and still catches any wrong weight, sign, batch or term.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    CASE_NAMES,
    NO_BATCHNORM_TRAIN,
    NUM_SAMPLES,
    dense_hessian,
    dense_hessian_of,
    make_case,
    rel_err,
    two_input_case,
    unpack_dict,
)
from torch.utils.data import DataLoader, TensorDataset

from curvscope import HessianOperator

FLOAT64_TOL = 1e-10


def gaussian(n: int, k: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def offsets(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """Flat indices of ``names`` (in model order) inside the all-parameter flat vector."""
    index, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            index.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(index)


# ----- the reference itself -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "bn_train_mse", "cnn_bn_train_ce"])
def test_dense_reference_matches_finite_differences_of_the_gradient(name):
    """Check the reference independently of double backward: the five-point central
    difference of the full-data gradient along v, error O(h^4). Train-mode BatchNorm has large
    higher derivatives: at h = 1e-3 the error measured 4e-7, at h = 1e-4 4e-11 (and <= 1e-12
    for the others; rounding is ~eps/h ~ 1e-12), so h = 1e-4 with 1e-8 relative is safe, and a
    wrong batch weight (>= 5%) or a missing batch breaks it."""
    case = make_case(name)
    H = dense_hessian_of(name)
    ref = copy.deepcopy(case.model).double()
    params = list(ref.parameters())
    base = [p.detach().clone() for p in params]
    v = gaussian(H.shape[0], seed=1)

    def full_gradient(shift: float) -> torch.Tensor:
        """Gradient of the mean loss over all samples at theta + shift * v."""
        with torch.no_grad():
            for p, p0, dv in zip(
                params, base, torch.split(v, [p.numel() for p in params]), strict=True
            ):
                p.copy_(p0 + shift * dv.view_as(p))
        total = torch.zeros_like(v)
        for X, Y in case.batches:
            loss = case.loss_fn(ref(X.double()), Y.double() if Y.is_floating_point() else Y)
            grads = torch.autograd.grad(loss, params)
            total += (X.shape[0] / NUM_SAMPLES) * torch.cat([g.reshape(-1) for g in grads])
        return total

    h = 1e-4
    finite_difference = (
        8 * (full_gradient(h) - full_gradient(-h)) - (full_gradient(2 * h) - full_gradient(-2 * h))
    ) / (12 * h)
    assert rel_err(H @ v, finite_difference) < 1e-8
    assert rel_err(H, H.T) < 1e-13  # the reference is not symmetrised by hand


# ----- products -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matvec_and_matmul_match_dense(name):
    case = make_case(name)
    H = dense_hessian_of(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    assert op.shape == H.shape == (case.num_params, case.num_params)
    assert op.dtype == torch.float64
    v = gaussian(op.num_params)
    expected = H @ v
    assert rel_err(op.matvec(v), expected) <= FLOAT64_TOL
    assert rel_err(op @ v, expected) <= FLOAT64_TOL
    assert op.num_samples == NUM_SAMPLES


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("mode", ["loop", "batched"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_matmat_matches_dense(name, mode, k):
    case = make_case(name)
    H = dense_hessian_of(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches, matmat_mode=mode)
    V = gaussian(op.num_params, k, seed=k)
    out = op.matmat(V)
    assert out.shape == (op.num_params, k)
    for j in range(k):  # column by column: a tiny column must not hide behind a large one
        assert rel_err(out[:, j], H @ V[:, j]) <= FLOAT64_TOL
    assert rel_err(op @ V, H @ V) <= FLOAT64_TOL
    assert op.matmat_mode == mode  # "batched" must not silently fall back to the loop


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "bn_train_mse"])
def test_to_dense_matches_reference(name):
    case = make_case(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    assert rel_err(op.to_dense(block_size=16), dense_hessian_of(name)) <= FLOAT64_TOL


@pytest.mark.parametrize("name", CASE_NAMES)
def test_products_are_symmetric(name):
    """u.Hv = v.Hu without the dense matrix; rounding is ~1e-16 of |u||Hv|."""
    case = make_case(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    U = gaussian(op.num_params, 2, seed=3)
    HU = op.matmat(U)
    u, v = U[:, 0], U[:, 1]
    uHv, vHu = float(u @ HU[:, 1]), float(v @ HU[:, 0])
    assert abs(uHv - vHu) <= 1e-12 * float(u.norm() * HU.norm())
    assert abs(uHv) > 1e-6 * float(u.norm() * HU.norm())  # not trivially 0 = 0


# ----- parameter subsets ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "bn_train_mse", "cnn_ce"])
def test_params_by_name_is_the_dense_sub_block(name):
    case = make_case(name)
    all_names = [n for n, _ in case.model.named_parameters()]
    chosen = [all_names[-1], all_names[0]]  # caller's order; the flat vector uses model order
    op = HessianOperator(case.model, case.loss_fn, case.batches, params=chosen)
    assert op.param_names == [all_names[0], all_names[-1]]
    index = offsets(case.model, chosen)
    block = dense_hessian_of(name)[index][:, index]
    assert op.num_params == index.numel()
    V = gaussian(op.num_params, 3, seed=4)
    assert rel_err(op.matmat(V), block @ V) <= FLOAT64_TOL
    # The reference restricted directly agrees with the sub-block (checks the reference too).
    direct = dense_hessian(case.model, case.loss_fn, case.batches, params=chosen)
    assert rel_err(direct, block) <= 1e-13


def test_params_by_object_is_the_dense_sub_block():
    case = make_case("bn_eval_ce")
    named = dict(case.model.named_parameters())
    chosen = ["1.weight", "3.weight"]  # BatchNorm scale and the head's weight
    op = HessianOperator(case.model, case.loss_fn, case.batches, params=[named[n] for n in chosen])
    assert op.param_names == chosen
    index = offsets(case.model, chosen)
    v = gaussian(op.num_params, seed=5)
    assert rel_err(op.matvec(v), dense_hessian_of("bn_eval_ce")[index][:, index] @ v) <= FLOAT64_TOL
    pieces = op.unflatten(v)
    assert list(pieces) == chosen
    assert all(pieces[n].shape == named[n].shape for n in chosen)


def test_frozen_parameters_are_left_out_by_default():
    case = make_case("tanh_mlp_ce")
    case.model[0].bias.requires_grad_(False)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert op.param_names == trainable
    index = offsets(case.model, trainable)
    v = gaussian(op.num_params, seed=6)
    assert (
        rel_err(op.matvec(v), dense_hessian_of("tanh_mlp_ce")[index][:, index] @ v) <= FLOAT64_TOL
    )


# ----- dtype ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_products_agree_to_float32_accuracy(name):
    """float32 products (eps 1.2e-7) measured 0.6-1.8e-7 relative to the float64 truth;
    1e-5 allows for accumulation over a few hundred terms, and float64 needs 1e-10."""
    case = make_case(name)
    op = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float32)
    assert op.dtype == torch.float32
    v = gaussian(op.num_params, seed=7)
    out = op.matvec(v.float())
    assert out.dtype == torch.float32
    assert rel_err(out, dense_hessian_of(name) @ v) <= 1e-5


# ----- data sources -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_dataloader_without_shuffle_equals_list(name):
    case = make_case(name)
    loader = DataLoader(TensorDataset(case.X, case.Y), batch_size=8, shuffle=False)
    from_list = HessianOperator(case.model, case.loss_fn, case.batches)
    from_loader = HessianOperator(case.model, case.loss_fn, loader)
    V = gaussian(from_list.num_params, 2, seed=8)
    assert rel_err(from_loader.matmat(V), from_list.matmat(V)) <= 1e-13
    assert from_loader.num_samples == NUM_SAMPLES


@pytest.mark.parametrize("name", NO_BATCHNORM_TRAIN)
def test_shuffling_dataloader_gives_the_same_products_without_batchnorm(name):
    """Without batch statistics the loss is a mean over samples: every order and batching
    gives the same Hessian, so products differ only by summation order (~1e-16)."""
    case = make_case(name)
    loader = DataLoader(
        TensorDataset(case.X, case.Y),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    op = HessianOperator(case.model, case.loss_fn, loader)
    V = gaussian(op.num_params, 2, seed=9)
    expected = dense_hessian_of(name) @ V
    first, second = op.matmat(V), op.matmat(V)
    assert rel_err(first, expected) <= 1e-12
    assert rel_err(second, expected) <= 1e-12


@pytest.mark.parametrize("inputs_as", ["tuple", "dict"])
def test_unpack_batch_with_dict_batches_and_two_inputs(inputs_as):
    model, loss_fn, batches = two_input_case()
    if inputs_as == "tuple":
        unpack = unpack_dict  # ((a, b), label): model(a, b)
    else:

        def unpack(batch):  # ({"a": a, "b": b}, label): model(a=a, b=b)
            return {"a": batch["a"], "b": batch["b"]}, batch["label"]

    op = HessianOperator(model, loss_fn, batches, unpack_batch=unpack)
    H = dense_hessian(model, loss_fn, batches, unpack=unpack_dict)
    V = gaussian(op.num_params, 3, seed=10)
    assert rel_err(op.matmat(V), H @ V) <= FLOAT64_TOL
    assert op.num_samples == NUM_SAMPLES


def test_uneven_last_batch_is_weighted_by_its_size():
    """Weighting batches equally instead of by size would give a different matrix: make sure
    the reference (and so every test above) can tell the two apart."""
    case = make_case("tanh_mlp_ce")
    per_batch = [dense_hessian(case.model, case.loss_fn, [b]) for b in case.batches]
    equal_weights = sum(per_batch) / len(per_batch)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    v = gaussian(op.num_params, seed=11)
    out = op.matvec(v)
    assert rel_err(out, dense_hessian_of("tanh_mlp_ce") @ v) <= FLOAT64_TOL
    assert rel_err(out, equal_weights @ v) > 1e-3
