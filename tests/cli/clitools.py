"""What the CLI tests share: running ``curvscope`` in-process, the command-line settings of
their tiny problems, and small readers of the results."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from curvscope import SpectralDensity
from curvscope.cli import main
from curvscope.tracking import load_run

#: Options of every in-process run (the tiny dense problems keep torch's threads).
QUIET = ["--no-progress"]
#: ... and of the structure, track and plot runs, on one thread.
QUIET_ONE_THREAD = ["--no-progress", "--threads", "1"]

#: The structure commands' problem: a 64-8-10 tanh MLP (610 parameters) on 120 digits.
STRUCTURE = ["--model", "structmod:model", "--data", "structmod:data"]
TINY = ["--iters", "12", "--probes", "2"]

#: track's problem: the same MLP on 120 digits, trained with MSE.
TRACK = ["--model", "trackmod:model", "--data", "trackmod:data"]
#: Every measurement that applies to a 10-output model (stochastic_edge needs one output).
ALL = "top,stability,trace,density,ntk"
#: track's one-output problem (a 64-8-1 tanh MLP regressing the sign target of 120 digits).
SIGN = ["--model", "trackmod:sign_model", "--data", "trackmod:sign_data", "--loss", "mse"]
SMALL = ["--density-iters", "6", "--density-probes", "2", "--trace-probes", "12"]
#: Text that would run code if a report page inserted it unescaped (curvscope report).
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "q" \'a\''


def run(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``curvscope *args --no-progress``."""
    code = main([*args, *QUIET])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_one_thread(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``curvscope *args --no-progress --threads 1``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, *QUIET_ONE_THREAD])
    return code, out.getvalue(), err.getvalue()


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


def first_moment(density: SpectralDensity) -> np.ndarray:
    """alpha_1 = v^T A v / ||v||^2 of each probe: the quadrature's first moment per probe."""
    return np.nansum(density.nodes * density.weights, axis=1)


def series(folder):
    """The run in ``folder`` (checked for problems) and its scalars without timings."""
    run_ = load_run(folder)
    assert run_.problems == []
    return run_, {
        name: values
        for name, values in run_.scalars.items()
        if not name.startswith("time_") and name != "unix_time"
    }


def assert_one_line_error(code: int, out: str, err: str, message: str) -> None:
    """A user mistake: exit status 2 and one stderr line naming it, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
