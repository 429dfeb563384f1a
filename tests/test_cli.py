"""The ``curvscope`` command, run in-process through ``curvscope.cli.main``.

Settings are tiny (a few Lanczos steps and probes) so the whole file runs in seconds; the
numbers themselves are checked against dense references only on a 15-parameter model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from curvscope import Eigenpairs, SpectralDensity, TraceEstimate
from curvscope.cli import main

QUIET = ["--no-progress"]

# A tiny problem whose Hessian we can build densely: a 3 -> 3 linear layer plus bias (n = 12)
# and a 3 -> 1 head (n = 4) with a softplus in between, MSE loss on 20 samples in 3 batches.
USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 1))

    def batches():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(20, 3, generator=g)
        y = torch.randn(20, 1, generator=g)
        return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 20, 8)]

    def dict_batches():
        return [{"x": x, "y": y} for x, y in batches()]

    def unpack(batch):
        return batch["x"], batch["y"]

    def wide():
        return nn.Linear(5, 1)

    def half_mse(outputs, targets):
        return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()

    not_callable = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``usermod`` importable from a folder on sys.path, as a user's own file would be."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "usermod.py"
    sys.modules.pop("usermod", None)


def dense_hessian(path: Path) -> np.ndarray:
    """Dense float64 Hessian of usermod's half-MSE mean loss over all 20 samples."""
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    model = namespace["build"]().double()
    data = namespace["batches"]()
    x = torch.cat([b[0] for b in data]).double()
    y = torch.cat([b[1] for b in data]).double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = theta[start : start + size].reshape(shape)
            start += size
        out = torch.func.functional_call(model, params, (x,))
        return 0.5 * ((out - y) ** 2).sum(dim=1).mean()

    return torch.autograd.functional.hessian(loss, flat).numpy()


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, *QUIET])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- subcommands


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


def test_top_prints_values_and_residuals(tmp_path, capsys):
    code, out, err = run(capsys, "top", "-k", "2", "--tol", "1e-6", "--out", str(tmp_path))
    assert code == 0, err
    pairs = Eigenpairs.load(tmp_path / "eigenpairs")
    assert pairs.vectors.shape == (3466, 2)
    assert np.all(pairs.residuals <= 1e-6) and pairs.converged.all()
    assert pairs.values[0] >= pairs.values[1]
    assert f"{pairs.values[0]:.12g}" in out and "residual" in out


@pytest.mark.parametrize("method, probes", [("hutch++", "6"), ("hutchinson", "4")])
def test_trace_prints_value_and_standard_error(tmp_path, capsys, method, probes):
    args = ["trace", "--method", method, "--probes", probes, "--out", str(tmp_path)]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    estimate = TraceEstimate.load(tmp_path / "trace")
    assert estimate.meta["method"] == method
    assert estimate.std_error >= 0
    assert f"{estimate.value:.6g} ± " in out


def test_default_results_folder_is_results_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "trace", "--method", "hutchinson", "--probes", "2")
    assert code == 0, err
    assert (tmp_path / "results" / "trace" / "trace.json").is_file()


# --------------------------------------------------------------------------- import paths


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


def test_file_path_import_and_unpack_batch_hook(tmp_path, capsys, user_module):
    args = ["trace", "--method", "hutchinson", "--probes", "4", "--out", str(tmp_path)]
    args += ["--model", f"{user_module}:build", "--data", f"{user_module}:dict_batches"]
    args += ["--unpack-batch", "usermod:unpack", "--loss", "mse"]
    code, _out, err = run(capsys, *args)
    assert code == 0, err
    assert TraceEstimate.load(tmp_path / "trace").meta["data"].endswith("usermod.py:dict_batches")


def test_params_subset(tmp_path, capsys, user_module):
    args = ["density", "--iters", "4", "--probes", "1", "--out", str(tmp_path)]
    args += ["--model", "usermod:build", "--data", "usermod:batches", "--params", "2.weight"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert SpectralDensity.load(tmp_path / "density").n == 3
    assert "params: 2.weight" in out


# --------------------------------------------------------------------------- errors


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
    # built-in digits, --data not given, the error names --data: see test_cli_messages.py.)
    args = ["trace", "--model", "usermod:wide", "--data", "usermod:batches", "--loss", "mse"]
    args += ["--out", str(tmp_path)]
    code, _out, err = run(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvscope: error: RuntimeError")
    assert "--debug" in lines[0]


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "top", "--loss", "hinge", "--debug", "--out", str(tmp_path))
    assert code == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("curvscope: error: unknown --loss")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "examples:" in out
    for command in ("density", "top", "trace"):
        assert main([command, "--help"]) == 0
        assert "--model" in capsys.readouterr().out


# --------------------------------------------------------------------------- installation


def test_entry_point_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("curvscope") == "curvscope.program:main"
    done = subprocess.run(
        [sys.executable, "-m", "curvscope", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: curvscope" in done.stdout
