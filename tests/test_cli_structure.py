"""``curvscope decompose``, ``overlap``, ``blocks`` and ``density --structure``, run in-process
through ``curvscope.cli.main`` with a parser that :func:`curvscope.cli_structure.register`
extends.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits in two batches) and the
densities use a few Lanczos steps and probes, so the file runs in seconds. The numbers are
checked against identities that hold exactly whatever the settings: the same probes see
H = G + (H - G) and G = class means + cross-class + within-class, so the first moments of the
densities (alpha_1 = v^T A v / ||v||^2 of each probe) add up; the overlap equals the library's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import textwrap

import numpy as np
import pytest

from curvscope import Eigenpairs, SpectralDensity
from curvscope import cli as cli_module
from curvscope.analysis import (
    BlockSpectra,
    GradientOverlap,
    SpectrumStructure,
    full_gradient,
    gradient_overlap,
)
from curvscope.cli_structure import TERMS, parse_groups, register, structure_summary
from curvscope.operators import HessianOperator

QUIET = ["--no-progress", "--threads", "1"]
TINY = ["--iters", "12", "--probes", "2"]

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from curvscope import zoo

    def model():
        return zoo.digits_mlp(hidden=(8,), seed=0)

    def data():
        return zoo.digits_data(batch_size=60, num_samples=120)

    def regressor():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 1))

    def regression_data():
        return [(x, y.float()[:, None]) for x, y in data()]

    def half_ce(outputs, targets):
        return 0.5 * torch.nn.functional.cross_entropy(outputs, targets)
    """
)
PROBLEM = ["--model", "structmod:model", "--data", "structmod:data"]


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pkg")
    (folder / "structmod.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("structmod", None)


#: curvscope.cli's own parser builder, before the fixture below replaces it.
original_build_parser = cli_module.build_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``curvscope`` parser with the structure commands registered on its subparsers."""
    parser = original_build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if "decompose" not in commands.choices:  # not yet wired into curvscope.cli
        register(commands, [cli_module._common_options()])
    return parser


@pytest.fixture(autouse=True)
def structure_parser(monkeypatch):
    monkeypatch.setattr(cli_module, "build_parser", build_parser)


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main([*args, *QUIET])
    return code, out.getvalue(), err.getvalue()


def first_moment(density: SpectralDensity) -> np.ndarray:
    """alpha_1 = v^T A v / ||v||^2 of each probe: the quadrature's first moment per probe."""
    return np.nansum(density.nodes * density.weights, axis=1)


# --------------------------------------------------------------------------- decompose


def test_decompose_writes_every_term_and_the_terms_add_up(tmp_path, user_module):
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


def test_decompose_honours_keep_graphs_and_it_changes_no_number(tmp_path, user_module, monkeypatch):
    """--keep-graphs reaches every operator of decompose (H, G, H - G, the G of the class
    terms); kept and rebuilt graphs give bit-identical densities."""
    from curvscope.operators import dataset

    modes = []

    class RecordingCache(dataset.GraphCache):
        def __init__(self, mode, *rest):
            modes.append(mode)
            super().__init__(mode, *rest)

    monkeypatch.setattr(dataset, "GraphCache", RecordingCache)
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


def test_decompose_mse_with_integer_targets_and_custom_loss(tmp_path, user_module):
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


# --------------------------------------------------------------------------- overlap


def test_overlap_matches_the_library_and_compares_subspaces(tmp_path, user_module):
    code, out, err = run("overlap", *PROBLEM, "--out", str(tmp_path / "a"))
    assert code == 0, err
    result = GradientOverlap.load(tmp_path / "a" / "overlap")
    assert result.k == 10 and result.n == 610  # k: the number of classes
    assert result.baseline == pytest.approx(10 / 610)
    assert result.shares.sum() == pytest.approx(result.overlap)
    pairs = Eigenpairs.load(tmp_path / "a" / "eigenpairs")
    assert pairs.vectors.shape == (610, 10)
    assert (tmp_path / "a" / "overlap.png").exists()
    # The same numbers from the library.
    namespace: dict = {}
    exec((user_module / "structmod.py").read_text(), namespace)
    op = HessianOperator(
        namespace["model"](), cli_module.LOSSES["cross_entropy"], namespace["data"]()
    )
    expected = gradient_overlap(op, full_gradient(op), k=10)
    assert result.overlap == pytest.approx(expected.overlap, rel=1e-6)
    assert result.curvature == pytest.approx(expected.curvature, rel=1e-9)
    assert f"{result.overlap:.4f}" in out and "k/n = 0.0164" in out
    # Against itself (the folder of the first run): the same subspace.
    args = ["-k", "4", "--compare", str(tmp_path / "a"), "--out", str(tmp_path / "b")]
    code, out, err = run("overlap", *PROBLEM, *args)
    assert code == 0, err
    meta = json.loads((tmp_path / "b" / "overlap.json").read_text())
    assert meta["subspace_k"] == 4
    assert meta["subspace_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert "subspace (1/k) tr(P_k P_k') = 1.0000" in out


# --------------------------------------------------------------------------- blocks


def test_blocks_default_layers_and_user_groups(tmp_path, user_module):
    code, out, err = run("blocks", *PROBLEM, *TINY, "--out", str(tmp_path / "layers"))
    assert code == 0, err
    table = BlockSpectra.load(tmp_path / "layers" / "blocks")
    assert table.names == ["0", "2"]
    assert [s.n for s in table.structures.values()] == [520, 90]
    assert (tmp_path / "layers" / "blocks.png").exists()
    lines = (tmp_path / "layers" / "blocks.csv").read_text().splitlines()
    assert lines[0].startswith("group,n,") and len(lines) == 3
    assert (tmp_path / "layers" / "blocks.txt").read_text().splitlines()[0].startswith("group")
    assert "neg. mass" in out and "2 diagonal Hessian blocks" in out
    args = ["--group", "weights=0.weight,2.weight", "--group", "2.bias", "--operator", "ggn"]
    code, out, err = run("blocks", *PROBLEM, *TINY, *args, "--out", str(tmp_path / "groups"))
    assert code == 0, err
    table = BlockSpectra.load(tmp_path / "groups" / "blocks")
    assert table.groups == {"weights": ["0.weight", "2.weight"], "2.bias": ["2.bias"]}
    assert table.meta["operator"] == "GGNOperator"


def test_parse_groups():
    assert parse_groups(None) is None
    assert parse_groups(["a=0,2", "4"]) == {"a": ["0", "2"], "4": ["4"]}


# --------------------------------------------------------------------------- density


def test_density_structure_flag_prints_and_saves_the_structure(tmp_path, user_module):
    code, out, err = run("density", *PROBLEM, *TINY, "--structure", "--out", str(tmp_path))
    assert code == 0, err
    density = SpectralDensity.load(tmp_path / "density")
    structure = SpectrumStructure.load(tmp_path / "density.structure")
    assert structure.lambda_max == density.lambda_max
    assert structure_summary(density) in out
    assert "outliers above the bulk" in out
    code, out, _ = run("density", *PROBLEM, *TINY, "--out", str(tmp_path / "plain"))
    assert code == 0 and "outliers above the bulk" not in out


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["blocks", "--params", "0.weight"], "not --params"),
        (["blocks", "--group", "=0.weight"], "--group '=0.weight'"),
        (["blocks", "--group", "x=no.such"], "neither a parameter nor a module"),
        (["overlap", "--compare", "no/such/eigenpairs"], "does not exist"),
        (["overlap", "-k", "700"], "must be below the number of parameters n = 610"),
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
def test_bad_arguments_exit_2_with_one_line(tmp_path, user_module, args, message):
    full = [args[0], *PROBLEM, *args[1:]] if "--model" not in args else args
    code, out, err = run(*full, "--out", str(tmp_path))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_compare_needs_saved_vectors(tmp_path, user_module):
    code, _, err = run("overlap", *PROBLEM, "--no-vectors", "--out", str(tmp_path / "a"))
    assert code == 0, err
    args = ["--compare", str(tmp_path / "a" / "eigenpairs.npz"), "--out", str(tmp_path / "b")]
    code, _, err = run("overlap", *PROBLEM, *args)
    assert code == 2 and "--no-vectors" in err


def test_help_lists_the_structure_commands(capsys):
    assert cli_module.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("decompose", "overlap", "blocks"):
        assert command in out
        assert cli_module.main([command, "--help"]) == 0
        assert "--model" in capsys.readouterr().out
