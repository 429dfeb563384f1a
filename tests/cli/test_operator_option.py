"""``--operator`` on density, top and trace: the Gauss-Newton matrix and the Fishers measured
from the command line equal the operators built in Python on the same problem (a 64-8-10 tanh
MLP, 610 parameters, on 120 digits, cross-entropy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clitools import STRUCTURE as PROBLEM
from clitools import TINY
from clitools import run_one_thread as run

from curvscope import Eigenpairs, SpectralDensity, TraceEstimate
from curvscope.operators import EmpiricalFisherOperator, FisherOperator, GGNOperator
from curvscope.zoo import digits_data, digits_mlp

OPERATORS = {
    "ggn": (GGNOperator, "Gauss-Newton matrix", "G"),
    "fisher": (FisherOperator, "Fisher (sampled labels)", "F"),
    "empirical-fisher": (EmpiricalFisherOperator, "empirical Fisher", "F_emp"),
}


def dense(name: str) -> np.ndarray:
    """The matrix of --operator NAME on the structmod problem, built in Python (float64)."""
    cls = OPERATORS[name][0]
    model = digits_mlp(hidden=(8,), seed=0)
    op = cls(model, F.cross_entropy, digits_data(batch_size=60, num_samples=120))
    return op.to_dense().to(torch.float64).numpy()


@pytest.mark.parametrize("name", list(OPERATORS))
def test_top_eigenvalues_of_each_operator(tmp_path, structure_module, name):
    cls, title, _ = OPERATORS[name]
    code, out, err = run("top", *PROBLEM, "-k", "2", "--operator", name, "--out", str(tmp_path))
    assert code == 0, err
    pairs = Eigenpairs.load(tmp_path / "eigenpairs")
    assert pairs.meta["operator"] == cls.__name__
    assert f"eigenvalues of the {title} of" in out and f"{title} products" in out
    exact = np.linalg.eigvalsh(dense(name))[::-1][:2]
    np.testing.assert_allclose(pairs.values, exact, rtol=1e-9)


def test_trace_and_density_of_the_gauss_newton_matrix(tmp_path, structure_module):
    args = ["--operator", "ggn", "--method", "hutchinson", "--probes", "30"]
    code, out, err = run("trace", *PROBLEM, *args, "--out", str(tmp_path))
    assert code == 0, err
    estimate = TraceEstimate.load(tmp_path / "trace")
    exact = float(np.trace(dense("ggn")))
    assert "tr(G) " in out and "tr(G)/n" in out
    assert abs(estimate.value - exact) <= 4 * estimate.std_error
    code, out, err = run("density", *PROBLEM, *TINY, "--operator", "ggn", "--out", str(tmp_path))
    assert code == 0, err
    density = SpectralDensity.load(tmp_path / "density")
    assert density.meta["operator"] == "GGNOperator"
    # G is positive semi-definite: its Ritz values are >= 0 up to rounding
    assert density.lambda_min >= -1e-10 * density.lambda_max
    assert "Gauss-Newton matrix products" in out


def test_hessian_stays_the_default(tmp_path, structure_module):
    code, out, err = run("trace", *PROBLEM, "--probes", "6", "--out", str(tmp_path))
    assert code == 0, err
    assert TraceEstimate.load(tmp_path / "trace").meta["operator"] == "HessianOperator"
    assert "tr(H) " in out and "Hessian of" in out
