"""``curvscope decompose``: the densities of H, G, H - G and G's class terms.

The numbers are checked against identities that hold exactly whatever the settings: the same
probes see H = G + (H - G) and G = class means + cross-class + within-class, so the first
moments of the densities (alpha_1 = v^T A v / ||v||^2 of each probe) add up.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits in two batches) and the
densities use a few Lanczos steps and probes, so the file runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clitools import STRUCTURE as PROBLEM
from clitools import TINY, assert_one_line_error, first_moment
from clitools import run_one_thread as run

from curvscope import SpectralDensity
from curvscope.analysis import SpectrumStructure
from curvscope.cli.decompose import TERMS


def test_decompose_writes_every_term_and_the_terms_add_up(tmp_path, structure_module):
    code, out, err = run("decompose", *PROBLEM, *TINY, "--out", str(tmp_path))
    assert code == 0, err
    densities = {name: SpectralDensity.load(tmp_path / f"density_{name}") for name in TERMS}
    for name in TERMS:
        assert SpectrumStructure.load(tmp_path / f"structure_{name}").n == 610
        assert densities[name].meta["term"] == name
        assert f"{name} (" in out
    assert (tmp_path / "decompose.png").stat().st_size > 10_000
    # Same seed, same probes: the quadratic forms add up as the operators do.
    m = {name: first_moment(d) for name, d in densities.items()}
    scale = np.abs(m["hessian"]).max()
    np.testing.assert_allclose(m["hessian"], m["ggn"] + m["residual"], atol=1e-10 * scale)
    parts = m["true_label"] + m["class_means"] + m["cross_class"] + m["within_class"]
    np.testing.assert_allclose(m["ggn"], parts, atol=1e-10 * scale)
    arrays = np.load(tmp_path / "decompose.npz")
    assert arrays["class_means_eigenvalues"].shape == (10,)
    assert arrays["cross_class_eigenvalues"].shape == (90,)
    assert arrays["true_label_eigenvalues"].shape == (10,)
    assert arrays["global_means_eigenvalues"].shape == (10,)
    assert arrays["class_counts"].sum() == 120
    summary = json.loads((tmp_path / "decompose.json").read_text())
    assert set(summary["terms"]) == set(TERMS)
    assert summary["class_loss"] == "cross_entropy"
    assert summary["residual_over_ggn"] > 0
    assert "curvscope decompose: Hessian split of cross_entropy over 120 samples" in out
    assert "class means: exact eigenvalues" in out
    assert "||H - G||_2 / ||G||_2" in out
    assert "negative mass" in out and "outliers above the bulk" in out


def test_decompose_honours_keep_graphs_and_it_changes_no_number(
    tmp_path, structure_module, monkeypatch
):
    """--keep-graphs reaches every operator of decompose (H, G, H - G, the G of the class
    terms); kept and rebuilt graphs give bit-identical densities."""
    from curvscope.operators import dataset_operator

    modes = []

    class RecordingCache(dataset_operator.GraphCache):
        def __init__(self, mode, *rest):
            modes.append(mode)
            super().__init__(mode, *rest)

    monkeypatch.setattr(dataset_operator, "GraphCache", RecordingCache)
    nodes = {}
    for choice, mode in (("none", False), ("auto", "auto")):
        out = tmp_path / choice
        args = ["--keep-graphs", choice, "--allow-tf32", "--out", str(out)]
        modes.clear()
        code, _, err = run("decompose", *PROBLEM, *TINY, *args)
        assert code == 0, err
        assert len(modes) >= 3 and set(modes) == {mode}
        nodes[choice] = {t: SpectralDensity.load(out / f"density_{t}").nodes for t in TERMS}
    for name in TERMS:
        np.testing.assert_array_equal(nodes["none"][name], nodes["auto"][name], err_msg=name)


def test_decompose_mse_with_integer_targets_and_custom_loss(tmp_path, structure_module):
    # The CLI's mse one-hot encodes integer targets; the class split gets one-hot targets too.
    code, out, err = run(
        "decompose", *PROBLEM, *TINY, "--loss", "mse", "--out", str(tmp_path / "mse")
    )
    assert code == 0, err
    assert "(mse, C = 10)" in out
    g = first_moment(SpectralDensity.load(tmp_path / "mse" / "density_ggn"))
    parts = sum(
        first_moment(SpectralDensity.load(tmp_path / "mse" / f"density_{name}"))
        for name in ("true_label", "class_means", "cross_class", "within_class")
    )
    np.testing.assert_allclose(g, parts, atol=1e-10 * np.abs(g).max())
    # A loss given by import path has no known class split: H, G and H - G only.
    args = ["--loss", "structmod:half_ce", "--out", str(tmp_path / "custom")]
    code, out, err = run("decompose", *PROBLEM, *TINY, *args)
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "custom").glob("density_*.npz"))
    assert written == ["density_ggn.npz", "density_hessian.npz", "density_residual.npz"]
    assert "class means" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "decompose",
                "--model",
                "structmod:regressor",
                "--data",
                "structmod:regression_data",
                "--loss",
                "mse",
                "--classes",
                "mse",
            ],
            "regression (float) targets have no classes",
        ),
        (["decompose", "--classes", "hinge"], "invalid choice"),
        (["decompose", "--gap-factor", "0"], "must be positive"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, structure_module, args, message):
    full = [args[0], *PROBLEM, *args[1:]] if "--model" not in args else args
    assert_one_line_error(*run(*full, "--out", str(tmp_path)), message)
