"""The operators never touch the user's model or global state, and bad input gets a clear
error that says what to fix (each test asserts on a fragment of that advice)."""

from __future__ import annotations

import functools
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import BATCH_SIZES, NUM_SAMPLES, make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvscope import HessianOperator, spectral_density, top_eigenpairs, trace

# ----- the model and global state are left bit for bit as they were ----------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything an analysis could disturb, cloned."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "versions": {n: p._version for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same(before: dict, after: dict) -> None:
    for kind in ("params", "buffers"):
        assert before[kind].keys() == after[kind].keys()
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), f"{kind} {name} changed"
            assert value.dtype == after[kind][name].dtype
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, f".grad of {name} was written"
        else:
            assert torch.equal(grad, after["grads"][name]), f".grad of {name} changed"
    assert before["versions"] == after["versions"], "a parameter was modified in place"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"]), "the global torch RNG moved"
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]), "the global numpy RNG moved"
    assert before["grad_enabled"] == after["grad_enabled"]


def prepared(name: str):
    """A case with a frozen parameter, a pre-set .grad and a parameter whose .grad is None."""
    case = make_case(name)
    params = list(case.model.parameters())
    params[1].requires_grad_(False)  # first layer's bias
    params[0].grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(0))
    assert params[-1].grad is None
    return case, next(n for n, p in case.model.named_parameters() if not p.requires_grad)


def data_for(case, kind: str):
    if kind == "list":
        return case.batches
    dataset = TensorDataset(case.X, case.Y)
    # No generator: the shuffling loader draws its seed from the global RNG, which an
    # analysis must leave where it was.
    return DataLoader(dataset, batch_size=BATCH_SIZES[0], shuffle=(kind == "shuffled loader"))


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(
    ("name", "data_kind"),
    [
        ("cnn_bn_train_ce", "list"),
        ("bn_train_mse", "loader"),
        ("bn_eval_ce", "list"),
        ("bn_eval_ce", "shuffled loader"),
    ],
)
def test_analysis_leaves_model_and_global_state_untouched(name, data_kind, grad_mode):
    case, frozen = prepared(name)
    data = data_for(case, data_kind)
    with torch.random.fork_rng(devices=[]):  # give the test a non-default RNG state
        torch.manual_seed(1234)
        torch.rand(3)
        np.random.seed(4321)
        with torch.set_grad_enabled(grad_mode):
            before = snapshot(case.model)
            steps = []
            for mode in ("loop", "batched"):
                op = HessianOperator(case.model, case.loss_fn, data, matmat_mode=mode)
                steps.append(("construct " + mode, snapshot(case.model)))
                n = op.num_params
                op.matvec(torch.ones(n, dtype=torch.float64))
                steps.append(("matvec", snapshot(case.model)))
                op.matmat(torch.ones(n, 3, dtype=torch.float64))
                steps.append(("matmat", snapshot(case.model)))
            spectral_density(op, num_iters=4, num_probes=2)
            steps.append(("spectral_density", snapshot(case.model)))
            top_eigenpairs(op, k=1, tol=1e-4)
            steps.append(("top_eigenpairs", snapshot(case.model)))
            trace(op, num_probes=6)
            steps.append(("trace", snapshot(case.model)))
        for step, after in steps:
            try:
                assert_same(before, after)
            except AssertionError as error:
                raise AssertionError(f"after {step}: {error}") from error
    assert frozen not in op.param_names


def test_operator_is_a_snapshot_of_the_parameters():
    """Later changes to the model do not leak into an operator built earlier."""
    case = make_case("bn_eval_ce")
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    v = torch.linspace(-1, 1, op.num_params, dtype=torch.float64)
    first = op.matvec(v)
    with torch.no_grad():
        for p in case.model.parameters():
            p.mul_(1.5)
        case.model[1].running_var.mul_(2.0)
    assert torch.equal(op.matvec(v), first)
    fresh = HessianOperator(case.model, case.loss_fn, case.batches).matvec(v)
    assert not torch.allclose(fresh, first)  # the change does matter to a new operator


# ----- errors that say what to fix -------------------------------------------------------------


def raises(error: type[Exception], fragment: str):
    return pytest.raises(error, match=re.escape(fragment))


@pytest.fixture
def mlp():
    return make_case("tanh_mlp_ce")


def test_empty_data(mlp):
    with raises(ValueError, "data yielded no batches: pass a non-empty DataLoader or list"):
        HessianOperator(mlp.model, mlp.loss_fn, [])


@pytest.mark.parametrize("kind", ["generator", "iterator"])
def test_one_shot_data(mlp, kind):
    data = (b for b in mlp.batches) if kind == "generator" else iter(mlp.batches)
    with raises(TypeError, "pass a list of (inputs, targets) batches or a DataLoader"):
        HessianOperator(mlp.model, mlp.loss_fn, data)


@pytest.mark.parametrize("batch_kind", ["triple", "dict", "tensor"])
def test_batch_that_is_not_a_pair(mlp, batch_kind):
    X, Y = mlp.batches[0]
    batch = {
        "triple": (X, Y, torch.ones(len(Y))),
        "dict": {"x": X, "y": Y},
        "tensor": X,
    }[batch_kind]
    with raises(ValueError, "pass unpack_batch=lambda batch: (inputs, targets)"):
        HessianOperator(mlp.model, mlp.loss_fn, [batch])


def test_empty_batch(mlp):
    X, Y = mlp.batches[0]
    with raises(ValueError, "batch 1 is empty: drop empty batches"):
        HessianOperator(mlp.model, mlp.loss_fn, [(X, Y), (X[:0], Y[:0])]).matvec(
            torch.zeros(mlp.num_params, dtype=torch.float64)
        )


def test_non_scalar_loss(mlp):
    with raises(ValueError, "reduction='mean'"):
        HessianOperator(mlp.model, nn.CrossEntropyLoss(reduction="none"), mlp.batches)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        functools.partial(F.cross_entropy, reduction="sum"),
    ],
    ids=["module", "partial"],
)
def test_summed_loss_is_refused(mlp, loss_fn):
    """A summed batch loss would silently give the Hessian of sum_b |b| L_b / N."""
    with raises(ValueError, "curvscope needs each batch's mean loss"):
        HessianOperator(mlp.model, loss_fn, mlp.batches)


def test_mean_loss_modules_are_accepted(mlp):
    H = HessianOperator(mlp.model, nn.CrossEntropyLoss(), mlp.batches)
    F_ = HessianOperator(
        mlp.model, functools.partial(F.cross_entropy, reduction="mean"), mlp.batches
    )
    v = torch.ones(mlp.num_params, dtype=torch.float64)
    assert torch.equal(H @ v, F_ @ v)


def test_loss_that_is_not_a_tensor(mlp):
    with raises(ValueError, "must return the batch's mean loss as a scalar tensor"):
        HessianOperator(mlp.model, lambda out, y: F.cross_entropy(out, y).item(), mlp.batches)


@pytest.mark.parametrize("bad_batch", [0, 2])
def test_non_finite_loss_names_the_batch(mlp, bad_batch):
    batches = [(X.clone(), Y) for X, Y in mlp.batches]
    batches[bad_batch][0][1, 2] = float("nan")
    v = torch.ones(mlp.num_params, dtype=torch.float64)
    fragment = f"the loss is nan on batch {bad_batch}"
    # Batch 0 is evaluated when the operator is built, the others on the first product.
    with raises(ValueError, fragment):
        HessianOperator(mlp.model, mlp.loss_fn, batches).matvec(v)


def test_non_finite_product_names_the_batch(mlp):
    """|x|^1.5 is finite with a finite gradient at x = 0 but an infinite second derivative:
    with a zeroed head the outputs are exactly 0, and only batch 2 has targets exactly 0."""
    with torch.no_grad():
        mlp.model[2].weight.zero_()
        mlp.model[2].bias.zero_()
    batches = []
    for index, (X, _) in enumerate(mlp.batches):
        targets = torch.zeros(len(X), 3) if index == 2 else torch.full((len(X), 3), 0.5)
        batches.append((X, targets))

    def loss_fn(out, targets):
        return (out - targets).abs().pow(1.5).mean()

    op = HessianOperator(mlp.model, loss_fn, batches)
    with raises(ValueError, "the curvature product is not finite on batch 2"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


def test_no_trainable_parameters(mlp):
    mlp.model.requires_grad_(False)
    with raises(ValueError, "no trainable parameters") as info:
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches)
    assert "params=[names]" in str(info.value)


def test_unknown_parameter_name(mlp):
    with raises(ValueError, "the model has no parameter named '9.weight'"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, params=["9.weight"])
    with raises(ValueError, "did you mean ['0.weight', '2.weight']"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, params=["weight"])


def test_bad_params_entries(mlp):
    with raises(ValueError, "a tensor in params is not a parameter of the model"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, params=[torch.zeros(3)])
    with raises(TypeError, "give names or parameters"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, params=[3])
    with raises(ValueError, "name at least one parameter"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, params=[])


def test_vector_of_wrong_shape(mlp):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batches)
    n = op.num_params
    with raises(ValueError, f"expected a block of shape (n={n}, k), got ({n + 1}, 1)"):
        op.matvec(torch.zeros(n + 1, dtype=torch.float64))
    with raises(ValueError, "use matmat for (n, k) blocks"):
        op.matvec(torch.zeros(n, 2, dtype=torch.float64))
    with raises(ValueError, f"expected a block of shape (n={n}, k), got ({n},)"):
        op.matmat(torch.zeros(n, dtype=torch.float64))
    with raises(ValueError, f"expected a block of shape (n={n}, k)"):
        op @ torch.zeros(2, n, dtype=torch.float64)


def test_vector_of_wrong_dtype_or_type(mlp):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batches)
    with raises(ValueError, "convert with v.to(torch.float64)"):
        op.matvec(torch.zeros(op.num_params, dtype=torch.float32))
    op32 = HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, dtype=torch.float32)
    with raises(ValueError, "convert with v.to(torch.float32)"):
        op32.matvec(torch.zeros(op.num_params, dtype=torch.float64))
    with raises(TypeError, "expected a torch.Tensor"):
        op.matmat(np.zeros((op.num_params, 1)))


def test_integer_dtype_option(mlp):
    with raises(ValueError, "dtype must be a floating dtype"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, dtype=torch.int64)


def test_dropout_module_in_train_mode(mlp):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 3))
    with raises(ValueError, "modules ['1'] are random in train mode") as info:
        HessianOperator(model, mlp.loss_fn, mlp.batches)
    assert "call model.eval()" in str(info.value)
    model.eval()  # the advice works: dropout is the identity in eval mode
    assert HessianOperator(model, mlp.loss_fn, mlp.batches).num_params == mlp.num_params


class FunctionalDropout(nn.Module):
    """Dropout written inside forward: no module to find, only the determinism check sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.dropout(torch.tanh(self.body(x)), p=0.3, training=True))


def test_functional_dropout_caught_by_determinism_check(mlp):
    model = FunctionalDropout()
    rng = torch.get_rng_state()
    with raises(ValueError, "the forward pass is random (dropout?)") as info:
        HessianOperator(model, mlp.loss_fn, mlp.batches)
    assert "remove the randomness" in str(info.value)
    assert torch.equal(rng, torch.get_rng_state())  # the failed check restored the RNG too


def test_shuffling_loader_with_batchnorm_in_train_mode():
    case = make_case("bn_train_mse")
    loader = DataLoader(TensorDataset(case.X, case.Y), batch_size=8, shuffle=True)
    with raises(ValueError, "pass a DataLoader with shuffle=False"):
        HessianOperator(case.model, case.loss_fn, loader)
    case.model.eval()  # the other advice: running statistics do not depend on the batch
    HessianOperator(case.model, case.loss_fn, loader)


class NoisyDigits(torch.utils.data.Dataset):
    """A dataset with random augmentation: noise from Python's, numpy's or torch's global RNG."""

    def __init__(self, X, Y, rng: str) -> None:
        self.X, self.Y, self.rng = X, Y, rng

    def __len__(self) -> int:
        return len(self.Y)

    def __getitem__(self, i):
        if self.rng == "python":
            noise = torch.tensor([random.gauss(0.0, 1.0) for _ in range(self.X[i].numel())])
            noise = noise.reshape(self.X[i].shape)
        elif self.rng == "numpy":
            noise = torch.from_numpy(np.random.standard_normal(self.X[i].shape))
        else:
            noise = torch.randn(self.X[i].shape, dtype=torch.float64)
        return self.X[i] + 0.1 * noise.to(self.X.dtype), self.Y[i]


def test_random_augmentation_outside_the_guarded_rngs_is_refused():
    """Every product walks the data again; augmentation drawn from Python's ``random`` changes
    the samples between passes, so the operator refuses such a loader. torch's and numpy's
    global RNGs are restored before every pass (curvscope.rng.preserved_rng), so their
    augmentation repeats and the operator is deterministic."""
    case = make_case("relu_mlp_mse")
    loader = DataLoader(NoisyDigits(case.X, case.Y, "python"), batch_size=8)
    with raises(ValueError, "batch 0 differs between two passes over the data"):
        HessianOperator(case.model, case.loss_fn, loader)
    HessianOperator(case.model, case.loss_fn, loader, check_determinism=False)  # opt out

    for rng in ("torch", "numpy"):
        repeatable = DataLoader(NoisyDigits(case.X, case.Y, rng), batch_size=8)
        op = HessianOperator(case.model, case.loss_fn, repeatable, keep_graphs=False)
        v = torch.ones(op.num_params, dtype=torch.float64)
        assert torch.equal(op.matvec(v), op.matvec(v)), rng


class Shrinking:
    """A re-iterable data source that drops its last batch after the first full pass."""

    def __init__(self, batches):
        self.batches = batches
        self.full_passes = 0

    def __iter__(self):
        batches = self.batches if self.full_passes == 0 else self.batches[:-1]
        yield from batches
        self.full_passes += 1


@pytest.mark.parametrize("kind", ["list mutated", "shrinking iterable"])
def test_data_source_that_changes_its_samples(mlp, kind):
    data = list(mlp.batches) if kind == "list mutated" else Shrinking(mlp.batches)
    op = HessianOperator(mlp.model, mlp.loss_fn, data)
    v = torch.ones(op.num_params, dtype=torch.float64)
    op.matvec(v)
    assert op.num_samples == NUM_SAMPLES
    if kind == "list mutated":
        data.pop()
    with raises(ValueError, f"yielded {NUM_SAMPLES - BATCH_SIZES[-1]} samples on this pass but "):
        op.matvec(v)


def test_bad_arguments(mlp):
    with raises(ValueError, "matmat_mode must be 'auto', 'batched' or 'loop', not 'fast'"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.batches, matmat_mode="fast")
    with raises(TypeError, "model must be a torch.nn.Module"):
        HessianOperator(lambda x: x, mlp.loss_fn, mlp.batches)
    with raises(TypeError, "loss_fn must be callable"):
        HessianOperator(mlp.model, "cross_entropy", mlp.batches)
