"""Papyan's split G = G0 + G1 + G2 + W (ICML 2019, arXiv:1901.08244) and the global per-logit
means B, against dense float64 constructions from per-sample delta_{i,c'} = J_i^T a_{i,c'}
(J_i row by row with torch.autograd), for cross-entropy and MSE, balanced and unbalanced."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import make_case
from jacobians import batch_jacobians
from torch import nn

from curvscope.operators.class_structure import class_decomposition, factor_tolerance

C = 3
SPLIT = ("true_label", "class_means", "cross_class", "within_class")


def per_sample_deltas(model, batches, loss: str) -> tuple[list[torch.Tensor], list[int]]:
    """delta_{i,c'} as one (C, n) matrix per sample, and each sample's true class."""
    deltas, classes = [], []
    eye = torch.eye(C, dtype=torch.float64)
    for out, J, y in batch_jacobians(model, batches):
        J = J.reshape(out.shape[0], C, -1)
        for i in range(out.shape[0]):
            if loss == "cross_entropy":
                p = torch.softmax(out[i], 0)
                a = p.sqrt()[:, None] * (eye - p[None])  # row c': sqrt(p_c') (e_c' - p)
                classes.append(int(y[i]))
            else:
                a = (2.0 / C) ** 0.5 * eye
                classes.append(int(y[i].argmax()))
            deltas.append(a @ J[i])  # (c', n)
    return deltas, classes


def dense_terms(model, batches, loss: str) -> dict[str, torch.Tensor]:
    """Every term from the formulas in the module docstring, with explicit loops."""
    deltas, classes = per_sample_deltas(model, batches, loss)
    N, n = len(deltas), deltas[0].shape[1]
    zero = torch.zeros(n, n, dtype=torch.float64)
    t = {name: zero.clone() for name in (*SPLIT, "ggn", "class_and_cross", "all_pairs")}
    mu = torch.zeros(C, C, n, dtype=torch.float64)
    share = torch.zeros(C, dtype=torch.float64)
    for c in range(C):
        D = torch.stack([d for d, k in zip(deltas, classes, strict=True) if k == c])
        share[c] = D.shape[0] / N
        mu[c] = D.mean(0)
        t["within_class"] += torch.einsum("ikn,ikm->nm", D - mu[c], D - mu[c]) / N
    for d in deltas:
        t["ggn"] += d.T @ d / N
    for c in range(C):
        others = [k for k in range(C) if k != c]
        mu_c = sum(mu[c, k] for k in others) / (C - 1)
        t["true_label"] += share[c] * torch.outer(mu[c, c], mu[c, c])
        t["class_means"] += share[c] * (C - 1) * torch.outer(mu_c, mu_c)
        for k in range(C):
            t["all_pairs"] += share[c] * torch.outer(mu[c, k], mu[c, k])
            if k != c:
                nu = mu[c, k] - mu_c
                t["cross_class"] += share[c] * torch.outer(nu, nu)
                t["class_and_cross"] += share[c] * torch.outer(mu[c, k], mu[c, k])
    beta = [sum(d[k] for d in deltas) / N for k in range(C)]  # global per-logit means
    t["global_means"] = sum(torch.outer(b, b) for b in beta)
    return t


def mlp(batchnorm: bool = False, seed: int = 11) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), *([nn.BatchNorm1d(5)] if batchnorm else []), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(5, C))


def labels(balanced: bool) -> torch.Tensor:
    """21 labels: 7 per class, or 11 / 6 / 4; shuffled so every batch mixes classes."""
    counts = (7, 7, 7) if balanced else (11, 6, 4)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]


def data(loss: str, balanced: bool) -> list:
    y = labels(balanced)
    x = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(6))
    t = y if loss == "cross_entropy" else F.one_hot(y, C).float()
    return [(x[a:b], t[a:b]) for a, b in ((0, 7), (7, 14), (14, 21))]


def build(name: str):
    """(model, loss_fn, batches, loss kind) of a named case."""
    if name.startswith("cnn_bn"):
        case = make_case("cnn_bn_train_ce")
        return case.model, case.loss_fn, case.batches, "cross_entropy"
    loss = "cross_entropy" if "_ce" in name else "mse"
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    return mlp("bn" in name), loss_fn, data(loss, "unbalanced" not in name), loss


CASES = [
    "mlp_ce_balanced",
    "mlp_ce_unbalanced",
    "mlp_mse_balanced",
    "mlp_mse_unbalanced",
    "mlp_bn_ce_unbalanced",
    "mlp_bn_mse_unbalanced",
    "cnn_bn_train_ce",
]


@pytest.mark.parametrize("name", CASES)
def test_each_term_matches_dense_and_the_split_adds_up(name):
    model, loss_fn, batches, loss = build(name)
    split = class_decomposition(model, loss_fn, batches, loss=loss)
    dense = dense_terms(model, batches, loss)
    scale = dense["ggn"].norm()
    for term, op in split.terms().items():
        error = (op.to_dense() - dense[term]).norm()
        assert error <= 1e-12 * scale, (term, float(error / scale))
    # G = G0 + G1 + G2 + W to rounding, G1+2 = G1 + G2, G0+G1+G2 = G - W
    M = {term: op.to_dense() for term, op in split.terms().items()}
    assert (sum(M[t] for t in SPLIT) - M["ggn"]).norm() <= 1e-13 * scale
    assert (M["class_means"] + M["cross_class"] - M["class_and_cross"]).norm() <= 1e-13 * scale
    assert (M["ggn"] - M["within_class"] - M["all_pairs"]).norm() <= 1e-13 * scale
    # ranks: C true-label means, C class means, C(C-2) cross-class directions; W and G - B PSD
    tol = 1e-10 * scale
    assert torch.linalg.matrix_rank(M["true_label"], atol=tol) == C
    assert torch.linalg.matrix_rank(M["class_means"], atol=tol) == C
    assert torch.linalg.matrix_rank(M["cross_class"], atol=tol) == C * (C - 2)
    for psd in (M["within_class"], M["ggn"] - M["global_means"]):
        assert torch.linalg.eigvalsh(0.5 * (psd + psd.T)).min() >= -tol
    assert split.class_counts.tolist() == [float((labels_of(batches) == c).sum()) for c in range(C)]


def labels_of(batches) -> torch.Tensor:
    y = torch.cat([t for _, t in batches])
    return y.argmax(1) if y.is_floating_point() else y


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_balanced_terms_have_papyans_code_spectra(loss):
    """With balanced classes the nonzero spectra are those of the Gram matrices that
    compute_G_decomp in deep-lab/DeepnetHessian hessian.py forms: mu_cc Gram / C (G0),
    mu_c Gram * (C-1) / C (G1), nu Gram / C (G2), Gram of all C^2 mu_{c,c'} / C (its G1+2)."""
    model, loss_fn, batches, _ = build(f"mlp_{'ce' if loss == 'cross_entropy' else 'mse'}_balanced")
    split = class_decomposition(model, loss_fn, batches, loss=loss)
    mu = split.pair_means.numpy()  # (c, c', n), computed as compute_delta_c_cp does
    mean = np.stack([sum(mu[c, k] for k in range(C) if k != c) / (C - 1) for c in range(C)])
    nu = np.stack([mu[c, k] - mean[c] for c in range(C) for k in range(C) if k != c])
    grams = {
        "true_label": mu[range(C), range(C)] @ mu[range(C), range(C)].T / C,
        "class_means": mean @ mean.T * (C - 1) / C,
        "cross_class": nu @ nu.T / C,
        "all_pairs": mu.reshape(C * C, -1) @ mu.reshape(C * C, -1).T / C,
    }
    for term, gram in grams.items():
        expected = np.sort(np.linalg.eigvalsh(gram))[::-1]
        got = np.sort(np.linalg.eigvalsh(getattr(split, term).to_dense().numpy()))[::-1]
        np.testing.assert_allclose(got[: len(expected)], expected, atol=1e-12 * expected[0])


def test_global_means_have_rank_c_minus_1_at_a_uniform_softmax():
    """Zero output layer: p_i = 1/C, so sum_c' delta_{i,c'} = 0 and B has rank C - 1 (the C - 1
    outliers of G at initialisation); with MSE, or a non-uniform softmax, rank C."""
    model = mlp()
    batches = data("cross_entropy", balanced=False)
    uniform = mlp()
    nn.init.zeros_(uniform[-1].weight)
    nn.init.zeros_(uniform[-1].bias)
    for net, loss, rank in ((uniform, "cross_entropy", C - 1), (model, "cross_entropy", C)):
        split = class_decomposition(net, F.cross_entropy, batches, loss=loss)
        B = split.global_means.to_dense()
        assert torch.linalg.matrix_rank(B, atol=1e-10 * B.norm()) == rank
    split = class_decomposition(model, F.mse_loss, data("mse", False), loss="mse")
    B = split.global_means.to_dense()
    assert torch.linalg.matrix_rank(B, atol=1e-10 * B.norm()) == C


def wide_float32_case():
    """300 samples, 10 classes: the float64-sized check refused this F.cross_entropy."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10))
    x = torch.randn(300, 8)
    y = torch.arange(300) % 10
    return model, [(x[:150], y[:150]), (x[150:], y[150:])]


def test_float32_accepts_cross_entropy_and_still_refuses_the_wrong_kind():
    model, batches = wide_float32_case()
    split = class_decomposition(model, F.cross_entropy, batches, dtype=torch.float32)
    assert split.pair_means.dtype == torch.float32
    assert factor_tolerance(torch.float32) > 1e3 * factor_tolerance(torch.float64)
    V = torch.randn(split.ggn.shape[0], 2, dtype=torch.float32)
    parts = sum(op @ V for op in split.split().values())
    assert (parts - split.ggn @ V).norm() <= 1e-5 * (split.ggn @ V).norm()
    with pytest.raises(ValueError, match="not that of mean-reduced mse"):
        class_decomposition(model, F.cross_entropy, batches, loss="mse", dtype=torch.float32)
    summed = lambda out, y: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="not that of mean-reduced cross_entropy"):
        class_decomposition(model, summed, batches, dtype=torch.float32)


def test_wrong_loss_kind_is_refused():
    case = make_case("tanh_mlp_ce")
    with pytest.raises(ValueError, match="not that of mean-reduced mse"):
        class_decomposition(case.model, case.loss_fn, case.batches, loss="mse")
    model, loss_fn, batches, _ = build("mlp_mse_balanced")
    with pytest.raises(ValueError, match="not that of mean-reduced cross_entropy"):
        class_decomposition(model, loss_fn, batches, loss="cross_entropy")
    # cross-entropy with probability targets has the right Hessian but no true classes
    with pytest.raises(ValueError, match="integer class targets"):
        class_decomposition(model, torch.nn.functional.cross_entropy, batches)


def test_missing_class_is_reported():
    case = make_case("tanh_mlp_ce")
    batches = [(x, torch.zeros_like(y)) for x, y in case.batches]
    with pytest.raises(ValueError, match="no samples"):
        class_decomposition(case.model, case.loss_fn, batches)
