"""``curvscope top``: extreme eigenpairs with their residuals, whatever graphs are kept."""

from __future__ import annotations

import numpy as np
from clitools import run

from curvscope import Eigenpairs


def test_top_prints_values_and_residuals(tmp_path, capsys):
    code, out, err = run(capsys, "top", "-k", "2", "--tol", "1e-6", "--out", str(tmp_path))
    assert code == 0, err
    pairs = Eigenpairs.load(tmp_path / "eigenpairs")
    assert pairs.vectors.shape == (3466, 2)
    assert np.all(pairs.residuals <= 1e-6) and pairs.converged.all()
    assert pairs.values[0] >= pairs.values[1]
    assert f"{pairs.values[0]:.12g}" in out and "residual" in out


def test_keep_graphs_choices_give_identical_results(tmp_path, capsys, user_module):
    """Kept graphs change the cost of a product, never its value: auto, all and none agree
    bit for bit."""
    common = ["--model", "usermod:build", "--data", "usermod:batches", "--loss", "usermod:half_mse"]
    values = {}
    for choice in (None, "all", "none", "auto"):
        flag = [] if choice is None else ["--keep-graphs", choice]
        out_dir = tmp_path / str(choice)
        code, _, err = run(capsys, "top", *common, *flag, "--out", str(out_dir))
        assert code == 0, err
        values[choice] = Eigenpairs.load(out_dir / "eigenpairs").values
    assert all(np.array_equal(v, values[None]) for v in values.values())
    code, _, err = run(capsys, "top", *common, "--keep-graphs", "--out", str(tmp_path / "bare"))
    assert code == 0, err  # the bare flag means "all"
    code, _, err = run(capsys, "top", *common, "--keep-graphs", "some")
    assert code == 2 and "invalid choice" in err
