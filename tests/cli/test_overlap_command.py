"""``curvscope overlap``: the gradient's share in the top-k eigenspace, as the library computes
it, and the overlap with saved eigenpairs.

The problem is tiny (a 64-8-10 tanh MLP, 610 parameters, on 120 digits in two batches) and the
densities use a few Lanczos steps and probes, so the file runs in seconds."""

from __future__ import annotations

import json

import pytest
from clitools import STRUCTURE as PROBLEM
from clitools import assert_one_line_error
from clitools import run_one_thread as run

from curvscope import Eigenpairs
from curvscope.analysis import GradientOverlap, full_gradient, gradient_overlap
from curvscope.losses import LOSSES
from curvscope.operators import HessianOperator


def test_overlap_matches_the_library_and_compares_subspaces(tmp_path, structure_module):
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
    exec((structure_module / "structmod.py").read_text(), namespace)
    op = HessianOperator(namespace["model"](), LOSSES["cross_entropy"], namespace["data"]())
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["overlap", "--compare", "no/such/eigenpairs"], "does not exist"),
        (["overlap", "-k", "700"], "must be below the number of parameters n = 610"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, structure_module, args, message):
    full = [args[0], *PROBLEM, *args[1:]] if "--model" not in args else args
    assert_one_line_error(*run(*full, "--out", str(tmp_path)), message)


def test_compare_needs_saved_vectors(tmp_path, structure_module):
    code, _, err = run("overlap", *PROBLEM, "--no-vectors", "--out", str(tmp_path / "a"))
    assert code == 0, err
    args = ["--compare", str(tmp_path / "a" / "eigenpairs.npz"), "--out", str(tmp_path / "b")]
    code, _, err = run("overlap", *PROBLEM, *args)
    assert code == 2 and "--no-vectors" in err
