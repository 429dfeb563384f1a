"""``curvscope density``: the SLQ density of the built-in problem and of a user's, saved,
plotted and summarised, with ``--mark-top`` and ``--structure``."""

from __future__ import annotations

import torch
from clitools import STRUCTURE as PROBLEM
from clitools import TINY, run
from clitools import run_one_thread as run_structure

from curvscope import Eigenpairs, SpectralDensity
from curvscope.analysis import SpectrumStructure
from curvscope.cli.report import structure_summary


def test_density_writes_reloadable_results_and_summary(tmp_path, capsys):
    rng_before = torch.get_rng_state()
    code, out, err = run(capsys, "density", "--iters", "8", "--probes", "2", "--out", str(tmp_path))
    assert code == 0, err
    for name in ("density.npz", "density.json", "density.png"):
        assert (tmp_path / name).is_file()
    density = SpectralDensity.load(tmp_path / "density")
    assert density.n == 3466
    assert density.nodes.shape == (2, 8)
    assert density.meta["model"] == "curvscope.zoo:trained_digits_mlp"
    assert density.meta["num_samples"] == 1797
    assert density.meta["operator"] == "HessianOperator"
    assert "lambda_max" in out and "density.png" in out and "n = 3,466" in out
    assert f"{density.lambda_max:.6g}" in out
    assert torch.equal(torch.get_rng_state(), rng_before), "the CLI changed the global RNG"


def test_density_mark_top_computes_eigenvalues_above_ritz_values(tmp_path, capsys):
    args = ["density", "--iters", "6", "--probes", "2", "--mark-top", "2", "--out", str(tmp_path)]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    density = SpectralDensity.load(tmp_path / "density")
    pairs = Eigenpairs.load(tmp_path / "top_eigenpairs")
    assert pairs.values.shape == (2,)
    # Ritz values lie inside the spectrum: the largest is a lower bound of lambda_max.
    assert pairs.values[0] >= density.lambda_max - 1e-9 * abs(pairs.values[0])
    assert "top 2" in out


def test_params_subset(tmp_path, capsys, user_module):
    args = ["density", "--iters", "4", "--probes", "1", "--out", str(tmp_path)]
    args += ["--model", "usermod:build", "--data", "usermod:batches", "--params", "2.weight"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert SpectralDensity.load(tmp_path / "density").n == 3
    assert "params: 2.weight" in out


def test_density_structure_flag_prints_and_saves_the_structure(tmp_path, structure_module):
    code, out, err = run_structure(
        "density", *PROBLEM, *TINY, "--structure", "--out", str(tmp_path)
    )
    assert code == 0, err
    density = SpectralDensity.load(tmp_path / "density")
    structure = SpectrumStructure.load(tmp_path / "density.structure")
    assert structure.lambda_max == density.lambda_max
    assert structure_summary(density) in out
    assert "outliers above the bulk" in out
    code, out, _ = run_structure("density", *PROBLEM, *TINY, "--out", str(tmp_path / "plain"))
    assert code == 0 and "outliers above the bulk" not in out
