"""The problem every command loads: a user's model, data and loss by import path against a
dense float64 Hessian, and the one-line errors of what cannot be loaded or run."""

from __future__ import annotations

import numpy as np
import pytest
from clitools import dense_hessian, run

from curvscope import Eigenpairs, SpectralDensity


def test_user_model_data_and_loss_match_the_dense_hessian(tmp_path, capsys, user_module):
    truth = np.linalg.eigvalsh(dense_hessian(user_module))
    common = ["--model", "usermod:build", "--data", "usermod:batches"]
    common += ["--loss", "usermod:half_mse"]
    code, out, err = run(capsys, "top", "-k", "2", *common, "--out", str(tmp_path / "top"))
    assert code == 0, err
    pairs = Eigenpairs.load(tmp_path / "top" / "eigenpairs")
    # float64 products and residuals below 1e-8: eigenvalues agree to rounding error.
    np.testing.assert_allclose(pairs.values, truth[::-1][:2], rtol=1e-9, atol=1e-12)
    assert "n = 16 parameters" in out

    # With n = 16 and 16 Lanczos steps the quadrature is exact: its nodes are the spectrum.
    args = ["density", "--iters", "16", "--probes", "1", *common, "--out", str(tmp_path / "d")]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    density = SpectralDensity.load(tmp_path / "d" / "density")
    np.testing.assert_allclose(np.sort(density.nodes[0]), truth, atol=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["density", "--model", "no_such_module_xyz:build"], "no module named"),
        (["density", "--model", "curvscope.zoo:no_such_factory"], "has no attribute"),
        (["density", "--model", "curvscope.zoo"], "not an import path"),
        (["density", "--model", "usermod:not_callable"], "not a torch.nn.Module"),
        (["density", "--data", "usermod:build"], "gave a torch.nn.Module"),
        (["top", "--loss", "hinge"], "unknown --loss 'hinge'"),
        (["top", "--params", "no.such.weight"], "no parameter named 'no.such.weight'"),
        (["trace", "--dtype", "float16"], "invalid choice"),
        (["trace", "--probes", "0"], "must be at least 1"),
        (["trace", "--probes", "3"], "hutch++ needs num_probes >= 6"),
        (["density", "--device", "not-a-device"], "not a device"),
        (["top", "-k", "5000"], "k must satisfy"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, user_module, args, message):
    code, out, err = run(capsys, *args, *(["--out", str(tmp_path)] if args else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_failure_inside_the_model_exits_1_with_one_line(tmp_path, capsys, user_module):
    # A 5-input model on the user's own 3-feature data: a shape error deep in torch. (On the
    # built-in digits, --data not given, the error names --data: see test_messages.py.)
    args = ["trace", "--model", "usermod:wide", "--data", "usermod:batches", "--loss", "mse"]
    args += ["--out", str(tmp_path)]
    code, _out, err = run(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvscope: error: RuntimeError")
    assert "--debug" in lines[0]
