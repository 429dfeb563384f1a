"""Papyan's class-means / cross-class / within-class split of G against a dense construction
from per-sample delta_{i,c'} = J_i^T a_{i,c'}."""

import pytest
import torch
import torch.nn.functional as F
from cases import make_case
from jacobians import batch_jacobians
from torch import nn

from curvscope.operators.class_structure import class_decomposition


def dense_terms(model, batches, loss: str, num_classes: int):
    """Dense G, class-means, cross-class and within-class terms from explicit deltas."""
    deltas: dict[int, list[torch.Tensor]] = {}
    total = sum(int(y.shape[0]) for _, y in batches)
    eye = torch.eye(num_classes, dtype=torch.float64)
    for out, J, y in batch_jacobians(model, batches):
        J = J.reshape(out.shape[0], num_classes, -1)
        for i in range(out.shape[0]):
            if loss == "cross_entropy":
                p = torch.softmax(out[i], 0)
                a = p.sqrt()[:, None] * (eye - p[None])
                c = int(y[i])
            else:
                a = (2.0 / num_classes) ** 0.5 * eye
                c = int(y[i].argmax())
            deltas.setdefault(c, []).append(a @ J[i])  # (c', n)
    n = J.shape[-1]
    G, Gc, Gx, Gw = (torch.zeros(n, n, dtype=torch.float64) for _ in range(4))
    for rows in deltas.values():
        D = torch.stack(rows)
        mu = D.mean(0)
        mu_c = mu.mean(0)
        share = len(rows) / total
        G += torch.einsum("ikn,ikm->nm", D, D) / total
        Gc += share * num_classes * torch.outer(mu_c, mu_c)
        Gx += share * (mu - mu_c).T @ (mu - mu_c)
        Gw += torch.einsum("ikn,ikm->nm", D - mu, D - mu) / total
    return {"ggn": G, "class_means": Gc, "cross_class": Gx, "within_class": Gw}


def onehot_mse_case(batchnorm: bool):
    torch.manual_seed(11)
    layers = (
        [nn.Linear(4, 5)]
        + ([nn.BatchNorm1d(5)] if batchnorm else [])
        + [nn.Tanh(), nn.Linear(5, 3)]
    )
    model = nn.Sequential(*layers)
    batches = [
        (torch.randn(b, 4), F.one_hot(torch.randint(0, 3, (b,)), 3).float()) for b in (7, 7, 4)
    ]
    return model, F.mse_loss, batches


CASES = {
    "tanh_mlp_ce": lambda: (lambda c: (c.model, c.loss_fn, c.batches))(make_case("tanh_mlp_ce")),
    "cnn_bn_train_ce": lambda: (lambda c: (c.model, c.loss_fn, c.batches))(
        make_case("cnn_bn_train_ce")
    ),
    "mse_onehot": lambda: onehot_mse_case(False),
    "mse_onehot_bn_train": lambda: onehot_mse_case(True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_terms_match_dense_and_add_up(name):
    model, loss_fn, batches = CASES[name]()
    loss = "mse" if name.startswith("mse") else "cross_entropy"
    split = class_decomposition(model, loss_fn, batches, loss=loss)
    dense = dense_terms(model, batches, loss, 3)
    for term, op in split.terms().items():
        M = op.to_dense()
        assert (M - dense[term]).norm() <= 1e-10 * dense["ggn"].norm(), term
    total = (
        split.class_means.to_dense() + split.cross_class.to_dense() + split.within_class.to_dense()
    )
    assert (total - split.ggn.to_dense()).norm() <= 1e-12 * dense["ggn"].norm()
    # Ranks: C class means, C(C-1) cross-class directions; the within term is PSD.
    tol = 1e-10 * dense["ggn"].norm()
    assert torch.linalg.matrix_rank(split.class_means.to_dense(), atol=tol) == 3
    assert torch.linalg.matrix_rank(split.cross_class.to_dense(), atol=tol) == 6
    within = split.within_class.to_dense()
    assert torch.linalg.eigvalsh(0.5 * (within + within.T)).min() >= -tol


def test_wrong_loss_kind_is_refused():
    case = make_case("tanh_mlp_ce")
    with pytest.raises(ValueError, match="not that of mean-reduced mse"):
        class_decomposition(case.model, case.loss_fn, case.batches, loss="mse")
    model, loss_fn, batches = onehot_mse_case(False)
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
