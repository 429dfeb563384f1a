"""Per-block spectra: groups, diagonal blocks of a dense Hessian, the table and its files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import tiny_problem
from torch import nn

from curvscope.analysis import BlockSpectra, block_spectra, default_groups, resolve_groups
from curvscope.operators import HessianOperator

BATCH_SIZES = (8, 8, 5)  # an uneven last batch


def dense_hessian(model, loss_fn, batches) -> torch.Tensor:
    """Hessian of the mean loss over all samples (batch b weighted |b| / N) w.r.t. all
    parameters in named_parameters order, row by row by double backward on copies."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    total = sum(len(y) for _, y in batches)
    loss = 0.0
    for x, y in batches:
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
        loss = loss + loss_fn(out, y) * (len(y) / total)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, retain_graph=True)])
        for g in grad
    ]
    return torch.stack(rows).detach()


def flat_indices(model: nn.Module, names: list[str]) -> np.ndarray:
    """Positions of the named parameters in the flat vector of all parameters."""
    out, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            out.extend(range(start, start + p.numel()))
        start += p.numel()
    return np.array(out)


def assert_same_eigenvalues(ritz: np.ndarray, exact: np.ndarray, tol: float) -> None:
    """Every Ritz value is an eigenvalue, and every distinct eigenvalue has a Ritz value
    (Lanczos from one start vector sees a repeated eigenvalue once)."""
    ritz = ritz[np.isfinite(ritz)]
    assert np.all(np.min(np.abs(ritz[:, None] - exact[None, :]), axis=1) < tol)
    assert np.all(np.min(np.abs(exact[:, None] - ritz[None, :]), axis=1) < tol)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv1d(1, 2, 3))
        self.head = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)) * self.scale


def test_default_groups_follow_module_paths():
    model, _, _ = tiny_problem()
    assert default_groups(model) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert default_groups(Nested()) == {
        "(root)": ["scale"],
        "features.conv1": ["features.conv1.weight", "features.conv1.bias"],
        "head": ["head.weight"],
    }


def test_user_groups_expand_modules_and_check_names():
    model = Nested()
    groups = resolve_groups(model, {"body": ["features", "scale"], "head": "head.weight"})
    assert groups == {
        "body": ["scale", "features.conv1.weight", "features.conv1.bias"],
        "head": ["head.weight"],
    }
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        resolve_groups(model, {"x": ["features.conv2"]})
    with pytest.raises(ValueError, match="no trainable parameter"):
        resolve_groups(model, {"x": ["frozen"]})


@pytest.fixture(scope="module")
def blocks_and_dense():
    model, loss_fn, batches = tiny_problem()
    # num_iters above every block's size: Lanczos is then exact (it stops at the invariant
    # Krylov space), so the Ritz values are the block's distinct eigenvalues.
    table = block_spectra(model, loss_fn, batches, num_iters=40, num_probes=2, seed=3)
    return model, loss_fn, batches, table, dense_hessian(model, loss_fn, batches)


def test_each_block_is_the_diagonal_block_of_the_dense_hessian(blocks_and_dense):
    model, loss_fn, batches, table, H = blocks_and_dense
    assert table.names == ["0", "2"]
    for name in table.names:
        idx = flat_indices(model, table.groups[name])
        block = H[np.ix_(idx, idx)]
        op = HessianOperator(model, loss_fn, batches, params=table.groups[name])
        torch.testing.assert_close(op.to_dense(), block, rtol=1e-10, atol=1e-12)
        exact = np.linalg.eigvalsh(block.numpy())
        density = table[name]
        assert density.n == idx.size
        # Breakdown stops Lanczos at residual sqrt(eps) * ||B||, so Ritz values are exact to
        # about 1.5e-8 * ||B||.
        tol = 1e-7 * np.abs(exact).max()
        for probe in range(density.num_probes):
            assert_same_eigenvalues(density.nodes[probe], exact, tol)
        row = next(r for r in table.to_rows() if r["group"] == name)
        assert row["lambda_max"] == pytest.approx(exact.max(), abs=tol)
        assert row["lambda_min"] == pytest.approx(exact.min(), abs=tol)
        assert row["n"] == idx.size


def test_blocks_differ_from_the_full_spectrum(blocks_and_dense):
    """The first layer's block is not the full Hessian: its top eigenvalue is smaller."""
    _, _, _, table, H = blocks_and_dense
    full = np.linalg.eigvalsh(H.numpy())
    assert table["0"].lambda_max < full.max() - 1e-6


def test_a_group_of_every_layer_is_the_full_hessian():
    model, loss_fn, batches = tiny_problem()
    table = block_spectra(
        model, loss_fn, batches, groups={"all": ["0", "2"]}, num_iters=40, num_probes=1
    )
    exact = np.linalg.eigvalsh(dense_hessian(model, loss_fn, batches).numpy())
    assert_same_eigenvalues(table["all"].nodes[0], exact, 1e-7 * np.abs(exact).max())


def test_rows_and_files_round_trip(blocks_and_dense, tmp_path):
    _, _, _, table, _ = blocks_and_dense
    rows = table.to_rows()
    assert [r["group"] for r in rows] == ["0", "2"]
    assert sum(r["n"] for r in rows) == 31
    for r in rows:
        s = table.structures[r["group"]]
        assert r["negative_mass"] == s.negative_mass
        assert r["negative_mass_band"] == s.negative_mass_band
        assert r["num_outliers"] == s.num_outliers
    table.save(tmp_path / "blocks")
    loaded = BlockSpectra.load(tmp_path / "blocks")
    assert loaded.groups == table.groups
    assert loaded.to_rows() == rows
    for name in table.names:
        np.testing.assert_array_equal(loaded[name].nodes, table[name].nodes)
        np.testing.assert_array_equal(loaded[name].weights, table[name].weights)
        assert loaded[name].meta["params"] == table.groups[name]
    assert loaded.meta["operator"] == "HessianOperator"
    assert "lambda_max" in table.table()
