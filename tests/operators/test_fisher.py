"""FisherOperator and EmpiricalFisherOperator against dense float64 references.

The references use nothing from curvscope: per-sample gradients g_i(y) come from plain
``torch.autograd`` on a float64 deep copy of the model, one backward pass per (sample, label),
with sample i's loss term taken from its batch's forward pass (so BatchNorm in train mode
normalises with the batch's statistics, as the operators define it). The Gauss-Newton
reference is tests/jacobians.py's J^T H_L J.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import BATCH_SIZES, CASE_NAMES, NUM_SAMPLES, make_case, rel_err
from jacobians import batch_jacobians, dense_ggn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvscope import EmpiricalFisherOperator, FisherOperator, top_eigenpairs
from curvscope.losses import LOSSES
from curvscope.operators import GGNOperator
from curvscope.operators.fisher import infer_loss_kind

CE_CASES = [name for name in CASE_NAMES if name.endswith("_ce")]
MSE_CASES = [name for name in CASE_NAMES if name.endswith("_mse")]


# ----- dense references --------------------------------------------------------------------------


def per_sample_gradients(case, labels_of) -> list[torch.Tensor]:
    """One (L_i, n) float64 matrix per sample i: rows g_i(y) for the labels ``labels_of(i, y_i)``.

    ``labels_of`` returns a list of targets of batch shape (1, ...) for sample i (global index).
    """
    ref = copy.deepcopy(case.model).double()  # keeps train/eval mode
    leaves = [p for p in ref.parameters() if p.requires_grad]
    rows, start = [], 0
    for X, Y in case.batches:
        outputs = ref(X.double())
        for j in range(len(X)):
            grads = []
            for label in labels_of(start + j, Y[j : j + 1]):
                loss = case.loss_fn(outputs[j : j + 1], label)
                grad = torch.autograd.grad(loss, leaves, retain_graph=True)
                grads.append(torch.cat([g.reshape(-1) for g in grad]))
            rows.append(torch.stack(grads))
        start += len(X)
    return rows


def true_labels(i, y):
    return [y.double() if y.is_floating_point() else y]


@functools.cache
def probabilities(name: str) -> torch.Tensor:
    """softmax of the float64 model's logits, (N, C)."""
    case = make_case(name)
    return torch.cat(
        [torch.softmax(out, dim=1) for out, _, _ in batch_jacobians(case.model, case.batches)]
    )


@functools.cache
def class_gradients(name: str) -> torch.Tensor:
    """g_i(c) for every sample and class of a cross-entropy case: (N, C, n)."""
    case = make_case(name)
    C = probabilities(name).shape[1]
    return torch.stack(
        per_sample_gradients(case, lambda i, y: [torch.tensor([c]) for c in range(C)])
    )


@functools.cache
def dense_ggn_of(name: str) -> torch.Tensor:
    case = make_case(name)
    return dense_ggn(case.model, case.loss_fn, case.batches)


def random_block(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----- the empirical Fisher ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_empirical_fisher_matches_per_sample_gradients(name):
    """F_emp = (1/N) sum_i g_i g_i^T at the true labels, BatchNorm in train mode included
    (g_i is then sample i's loss term's gradient within its batch). Rounding only: 1e-12."""
    case = make_case(name)
    grads = torch.cat(per_sample_gradients(case, true_labels))  # (N, n)
    reference = grads.T @ grads / NUM_SAMPLES
    op = EmpiricalFisherOperator(case.model, case.loss_fn, case.batches)
    dense = op.to_dense()
    assert rel_err(dense, reference) <= 1e-12
    assert torch.equal(dense, dense.T) or rel_err(dense, dense.T) <= 1e-15
    V = random_block(op.num_params, 3, 0)
    assert rel_err(op.matmat(V), reference @ V) <= 1e-12
    assert op.num_samples == NUM_SAMPLES


def test_empirical_fisher_is_the_gradient_outer_product_for_one_sample_batches():
    """With batches of one sample, F_emp's rank-one terms are the batch gradients themselves:
    F_emp v = (1/N) sum_b g_b (g_b . v), checked against torch.autograd's batch gradients."""
    case = make_case("tanh_mlp_ce")
    batches = [(case.X[i : i + 1], case.Y[i : i + 1]) for i in range(6)]
    ref = copy.deepcopy(case.model).double()
    grads = []
    for X, Y in batches:
        loss = case.loss_fn(ref(X.double()), Y)
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(ref.parameters()))])
        )
    G = torch.stack(grads)
    op = EmpiricalFisherOperator(case.model, case.loss_fn, batches)
    assert rel_err(op.to_dense(), G.T @ G / len(batches)) <= 1e-12


# ----- the exact Fisher --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_exact_fisher_equals_the_gauss_newton_matrix(name):
    """F = G exactly: E_y a a^T is the loss's Hessian in the outputs for cross-entropy
    (softmax labels) and for MSE (labels Normal(f, D/2 I)). Reference: dense J^T H_L J."""
    case = make_case(name)
    op = FisherOperator(case.model, case.loss_fn, case.batches, mode="exact")
    G = dense_ggn_of(name)
    assert rel_err(op.to_dense(), G) <= 1e-12
    V = random_block(op.num_params, 2, 1)
    assert (
        rel_err(op.matmat(V), GGNOperator(case.model, case.loss_fn, case.batches).matmat(V))
        <= 1e-12
    )


@pytest.mark.parametrize("name", CE_CASES)
def test_exact_fisher_is_the_expectation_over_labels(name):
    """The definition, term by term: (1/N) sum_i sum_c p_ic g_i(c) g_i(c)^T with g_i(c) the
    autograd gradient of sample i's loss at label c."""
    case = make_case(name)
    p, g = probabilities(name), class_gradients(name)
    reference = torch.einsum("ic,icm,icn->mn", p, g, g) / NUM_SAMPLES
    op = FisherOperator(case.model, case.loss_fn, case.batches, mode="exact")
    assert rel_err(op.to_dense(), reference) <= 1e-12


# ----- the Monte-Carlo Fisher --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "relu_mlp_mse", "cnn_bn_train_ce", "bn_train_mse"])
def test_mc_fisher_matches_its_drawn_labels(name):
    """F_MC = (1/N) sum_i (1/S) sum_s g_i(y_is) g_i(y_is)^T for the labels it drew (exposed by
    sampled_targets), each gradient by autograd through loss_fn: rounding only, 1e-12."""
    case = make_case(name)
    S = 3
    op = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=S, seed=7)
    drawn = torch.cat(op.sampled_targets())  # (N, S) classes or (N, S, D) targets
    assert drawn.shape[:2] == (NUM_SAMPLES, S)
    grads = torch.cat(
        per_sample_gradients(case, lambda i, y: [drawn[i, s][None] for s in range(S)])
    )
    reference = grads.T @ grads / (NUM_SAMPLES * S)
    assert rel_err(op.to_dense(), reference) <= 1e-12


def test_mc_labels_follow_the_predictive_distribution():
    """Cross-entropy labels are drawn from softmax(f_i): with 4000 draws per sample every
    class frequency is within 4 binomial standard errors of p_ic. MSE labels y = f + sqrt(D/2) z
    have mean f and variance D/2 per entry (within 4 standard errors)."""
    case = make_case("tanh_mlp_ce")
    S = 4000
    op = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=S)
    labels = torch.cat(op.sampled_targets())
    p = probabilities("tanh_mlp_ce")
    freq = F.one_hot(labels, p.shape[1]).double().mean(dim=1)
    se = (p * (1 - p) / S).sqrt()
    assert ((freq - p).abs() <= 4 * se).all()

    case = make_case("relu_mlp_mse")
    op = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=S)
    targets = torch.cat(op.sampled_targets())  # (N, S, D)
    outputs = torch.cat([out for out, _, _ in batch_jacobians(case.model, case.batches)])
    D = outputs.shape[1]
    noise = targets - outputs[:, None, :]
    assert ((noise.mean(dim=1)).abs() <= 4 * math.sqrt(D / 2 / S)).all()
    var_se = (D / 2) * math.sqrt(2 / (S - 1))  # chi-square: sd of the sample variance
    assert ((noise.var(dim=1) - D / 2).abs() <= 4 * var_se).all()


def mc_moments(name: str, v: torch.Tensor) -> tuple[float, float]:
    """Mean v^T F v and per-draw variance sum_i Var_y((g_i(y) . v)^2) / N^2 (for S = 1)."""
    if name.endswith("_ce"):
        p, g = probabilities(name), class_gradients(name)
        h2 = (g @ v) ** 2  # (N, C)
        mean_i = (p * h2).sum(dim=1)
        var_i = (p * h2**2).sum(dim=1) - mean_i**2
    else:  # (g . v)^2 = (2/D) ||J_i v||^2 chi^2_1
        q = []
        for out, J, _ in batch_jacobians(make_case(name).model, make_case(name).batches):
            D = out.shape[1]
            q.append((2 / D) * ((J @ v).reshape(len(out), D) ** 2).sum(dim=1))
        mean_i = torch.cat(q)
        var_i = 2 * mean_i**2
    return float(mean_i.sum() / NUM_SAMPLES), float(var_i.sum() / NUM_SAMPLES**2)


def mc_frobenius(name: str) -> tuple[torch.Tensor, float]:
    """(F, E ||F_MC - F||_F^2 for S = 1) from the exact per-sample moments."""
    if name.endswith("_ce"):
        p, g = probabilities(name), class_gradients(name)
        Fi = torch.einsum("ic,icm,icn->imn", p, g, g)
        fourth = (p * (g**2).sum(dim=2) ** 2).sum(dim=1)  # E ||g||^4
        extra = fourth - (Fi**2).sum(dim=(1, 2))
        return Fi.mean(dim=0), float(extra.sum() / NUM_SAMPLES**2)
    total = 0.0
    for out, J, _ in batch_jacobians(make_case(name).model, make_case(name).batches):
        D = out.shape[1]
        for i in range(len(out)):
            Ji = J[i * D : (i + 1) * D]
            M = Ji @ Ji.T  # E||g||^4 - ||F_i||^2 = (2/D)^2 ((tr M)^2 + tr M^2)
            total += (2 / D) ** 2 * float(torch.trace(M) ** 2 + torch.trace(M @ M))
    return dense_ggn_of(name), total / NUM_SAMPLES**2


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "relu_mlp_mse"])
def test_mc_fisher_converges_to_the_exact_one_at_the_mc_rate(name):
    """E F_MC = F, and the error shrinks like 1/sqrt(S) with the known variance:
    v^T F_MC v lies within 4 standard errors of v^T F v (S = 1, 16, 256; three v), and
    ||F_MC - F||_F^2 is within a factor 4 of its expectation E / S at S = 4 and S = 256
    (the error is a sum over 21 independent samples: its ratio to the mean stays O(1))."""
    case = make_case(name)
    n = case.num_params
    probes = random_block(n, 3, 3)
    for S in (1, 16, 256):
        op = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=S, seed=S)
        Fv = op.matmat(probes)
        for j in range(3):
            mean, var = mc_moments(name, probes[:, j])
            assert abs(float(probes[:, j] @ Fv[:, j]) - mean) <= 4 * math.sqrt(var / S), (S, j)
    exact, per_draw = mc_frobenius(name)
    for S in (4, 256):
        op = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=S, seed=11)
        ratio = float(((op.to_dense() - exact) ** 2).sum()) / (per_draw / S)
        assert 0.25 <= ratio <= 4.0, (S, ratio)


# ----- a fixed matrix: deterministic, seeded, and nothing else moves -----------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def assert_same(before: dict, after: dict) -> None:
    for kind in ("params", "buffers"):
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), f"{kind} {name} changed"
    assert all(g is None for g in after["grads"].values()), ".grad was written"
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"]), "the global torch RNG moved"
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]), "the global numpy RNG moved"


@pytest.mark.parametrize("name", ["cnn_bn_train_ce", "bn_train_mse"])
def test_products_are_deterministic_and_touch_nothing(name):
    case = make_case(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        before = snapshot(case.model)
        ops = [
            FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=2, seed=5),
            FisherOperator(case.model, case.loss_fn, case.batches, mode="exact"),
            EmpiricalFisherOperator(case.model, case.loss_fn, case.batches),
        ]
        assert_same(before, snapshot(case.model))
        V = random_block(case.num_params, 3, 4)
        for op in ops:
            first = op.matmat(V)
            assert torch.equal(op.matmat(V), first)  # kept graphs
            assert torch.equal(op.matvec(V[:, 1]), first[:, 1])
            rebuilt = type(op)(
                case.model,
                case.loss_fn,
                case.batches,
                keep_graphs=False,
                **(
                    {"mode": op.mode, "mc_samples": op.mc_samples, "seed": op.seed}
                    if isinstance(op, FisherOperator)
                    else {}
                ),
            )
            assert torch.equal(rebuilt.matmat(V), first)  # same seed, same matrix, bit for bit
            assert_same(before, snapshot(case.model))
        top_eigenpairs(ops[0], k=1, tol=1e-6)
        assert_same(before, snapshot(case.model))


def test_seed_and_sample_count_choose_the_matrix():
    case = make_case("tanh_mlp_ce")
    build = functools.partial(FisherOperator, case.model, case.loss_fn, case.batches)
    a, b, c = build(seed=0).to_dense(), build(seed=0).to_dense(), build(seed=1).to_dense()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert build(mc_samples=2).sampled_targets()[0].shape == (BATCH_SIZES[0], 2)
    assert torch.linalg.eigvalsh(a).min() >= -1e-12 * torch.linalg.eigvalsh(a).max()


def test_parameter_blocks_share_the_labels():
    """Labels depend on the seed and the outputs, not on params: the MC Fisher of a block is the
    diagonal block of the full MC Fisher."""
    case = make_case("tanh_mlp_ce")
    full = FisherOperator(case.model, case.loss_fn, case.batches, mc_samples=2).to_dense()
    block = FisherOperator(
        case.model, case.loss_fn, case.batches, mc_samples=2, params=["2.weight"]
    )
    start = sum(p.numel() for p in list(case.model.parameters())[:2])
    size = block.num_params
    assert rel_err(block.to_dense(), full[start : start + size, start : start + size]) <= 1e-12


def test_exact_fisher_and_empirical_fisher_accept_a_shuffling_loader():
    case = make_case("bn_eval_ce")
    loader = DataLoader(TensorDataset(case.X, case.Y), batch_size=8, shuffle=True)
    for op, reference in (
        (
            FisherOperator(case.model, case.loss_fn, loader, mode="exact"),
            dense_ggn_of("bn_eval_ce"),
        ),
        (
            EmpiricalFisherOperator(case.model, case.loss_fn, loader),
            EmpiricalFisherOperator(case.model, case.loss_fn, case.batches).to_dense(),
        ),
    ):
        assert rel_err(op.to_dense(), reference) <= 1e-12


# ----- losses: which ones, and clear refusals ----------------------------------------------------


def test_loss_kinds_are_read_from_known_losses():
    assert infer_loss_kind(F.cross_entropy) == "cross_entropy"
    assert infer_loss_kind(nn.CrossEntropyLoss()) == "cross_entropy"
    assert infer_loss_kind(functools.partial(F.cross_entropy, reduction="mean")) == "cross_entropy"
    assert infer_loss_kind(nn.MSELoss()) == "mse"
    assert infer_loss_kind(F.mse_loss) == "mse"
    assert {name: infer_loss_kind(fn) for name, fn in LOSSES.items()} == {
        "cross_entropy": "cross_entropy",
        "mse": "mse",
    }


def test_mse_on_integer_labels_and_a_named_loss():
    """curvscope.losses.mse_loss one-hot encodes class labels (the zoo's MSE); a custom
    function computing the same loss is accepted once named with loss=."""
    case = make_case("tanh_mlp_ce")
    G = GGNOperator(case.model, LOSSES["mse"], case.batches).to_dense()
    op = FisherOperator(case.model, LOSSES["mse"], case.batches, mode="exact")
    assert op.loss == "mse" and rel_err(op.to_dense(), G) <= 1e-12

    def my_ce(out, y):
        return -torch.log_softmax(out, dim=1).gather(1, y[:, None]).mean()

    named = FisherOperator(case.model, my_ce, case.batches, loss="cross_entropy", mode="exact")
    assert rel_err(named.to_dense(), dense_ggn_of("tanh_mlp_ce")) <= 1e-12


@pytest.fixture
def mlp():
    return make_case("tanh_mlp_ce")


def test_unknown_loss_must_be_named(mlp):
    with pytest.raises(ValueError, match="pass loss='cross_entropy'"):
        FisherOperator(mlp.model, lambda out, y: F.cross_entropy(out, y), mlp.batches)


@pytest.mark.parametrize(
    "loss_fn, loss",
    [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), None),
        (lambda out, y: F.nll_loss(out, y), "cross_entropy"),  # outputs taken as log-probs
        (nn.CrossEntropyLoss(), "mse"),
        (lambda out, y: 2 * F.cross_entropy(out, y), "cross_entropy"),
    ],
    ids=["class weights", "nll on logits", "wrong kind", "scaled"],
)
def test_loss_whose_hessian_is_not_the_named_one_is_refused(mlp, loss_fn, loss):
    with pytest.raises(ValueError, match="Hessian in the outputs is not that of mean-reduced"):
        FisherOperator(mlp.model, loss_fn, mlp.batches, loss=loss)


def test_summed_loss_is_refused(mlp):
    with pytest.raises(ValueError, match="each batch's mean loss"):
        FisherOperator(mlp.model, nn.CrossEntropyLoss(reduction="sum"), mlp.batches)
    with pytest.raises(ValueError, match="each batch's mean loss"):
        EmpiricalFisherOperator(mlp.model, nn.CrossEntropyLoss(reduction="sum"), mlp.batches)


def test_empirical_fisher_refuses_a_loss_that_is_not_a_mean_of_per_sample_losses(mlp):
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not the batch mean of per-sample losses"):
        EmpiricalFisherOperator(mlp.model, weighted, mlp.batches)

    def coupled(out, y):  # the batch's logits are centred together: samples are coupled
        return F.cross_entropy(out - out.mean(dim=0), y)

    with pytest.raises(ValueError, match="not the batch mean of per-sample losses"):
        EmpiricalFisherOperator(mlp.model, coupled, mlp.batches)
    # any loss that averages per-sample terms is fine, with no loss kind to name
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    EmpiricalFisherOperator(mlp.model, smooth, mlp.batches)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mode": "true"}, ValueError, "mode must be 'mc' (sampled labels) or 'exact'"),
        ({"mc_samples": 0}, ValueError, "mc_samples must be an integer >= 1"),
        ({"mc_samples": 2.5}, ValueError, "mc_samples must be an integer >= 1"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
        ({"loss": "nll"}, ValueError, "loss must be 'cross_entropy' or 'mse'"),
    ],
)
def test_bad_fisher_arguments(mlp, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        FisherOperator(mlp.model, mlp.loss_fn, mlp.batches, **kwargs)


def test_mc_fisher_refuses_a_shuffling_loader(mlp):
    loader = DataLoader(TensorDataset(mlp.X, mlp.Y), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="pass a DataLoader with shuffle=False"):
        FisherOperator(mlp.model, mlp.loss_fn, loader)


def test_cross_entropy_fisher_needs_logits_of_shape_b_c(mlp):
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    batches = [(X, Y.double().clamp(max=1.0)) for X, Y in mlp.batches]
    with pytest.raises(ValueError, match="needs logits of shape \\(B, C\\) with C >= 2"):
        FisherOperator(model, F.binary_cross_entropy_with_logits, batches, loss="cross_entropy")


def test_mse_fisher_takes_any_output_shape():
    """Regression with (B,) outputs: D = 1, labels Normal(f, 1/2), F = G."""
    case = make_case("relu_mlp_mse")
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0))
    batches = [(X, Y[:, 0]) for X, Y in case.batches]
    G = GGNOperator(model, F.mse_loss, batches).to_dense()
    assert rel_err(FisherOperator(model, F.mse_loss, batches, mode="exact").to_dense(), G) <= 1e-12
    op = FisherOperator(model, F.mse_loss, batches, mc_samples=2)
    assert op.sampled_targets()[0].shape == (BATCH_SIZES[0], 2)


def test_sampled_targets_needs_mc_mode(mlp):
    op = FisherOperator(mlp.model, mlp.loss_fn, mlp.batches, mode="exact")
    with pytest.raises(ValueError, match="draws no labels"):
        op.sampled_targets()


def test_data_that_changes_its_batches_is_refused(mlp):
    data = list(mlp.batches)
    op = FisherOperator(mlp.model, mlp.loss_fn, data, keep_graphs=False)
    data.append(mlp.batches[0])
    with pytest.raises(ValueError, match="has no labels drawn for it"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


def test_model_returning_a_dict_is_refused(mlp):
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.layer(x)}

    with pytest.raises(TypeError, match="single tensor"):
        EmpiricalFisherOperator(
            DictNet(), lambda out, y: F.cross_entropy(out["logits"], y), mlp.batches
        )


@pytest.mark.parametrize(
    "kwargs", [{"mc_samples": 3}, {"mode": "exact"}, None], ids=["mc", "exact", "empirical"]
)
def test_batched_and_looped_products_agree(kwargs):
    """matmat_mode="batched" (one vmapped pass for J V and J^T) equals the loop to rounding."""
    case = make_case("bn_train_mse")
    cls = EmpiricalFisherOperator if kwargs is None else FisherOperator
    build = functools.partial(cls, case.model, case.loss_fn, case.batches, **(kwargs or {}))
    V = random_block(case.num_params, 4, 8)
    assert (
        rel_err(build(matmat_mode="batched").matmat(V), build(matmat_mode="loop").matmat(V))
        <= 1e-14
    )
