"""``--json``: one JSON object on stdout with what a command measured.

With --json a command's text (the summary lines, notes, warnings) goes to stderr and stdout
holds exactly one line: a JSON object (strict JSON: NaN and infinities are written as null)
that the command prints when it has succeeded. A failure prints nothing on stdout: the one-line
error goes to stderr and the exit status says what happened (2 for a user error), so a script
reads stdout only when the status is 0. Under torchrun only rank 0 prints it (the other ranks'
stdout goes nowhere, :func:`~curvscope.cli.options.rank0_output`).

Every object has ``command``, ``curvscope_version``, ``files`` (the paths written) and
``wall_time_s``; a command that measures a problem adds ``problem`` (:func:`problem_fields`);
the rest is the command's own (docs/usage.md lists the keys).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .._version import __version__

JSON_HELP = (
    "print one JSON object with the results on stdout (the summary lines go to stderr; "
    "NaN is written as null)"
)

#: Where the JSON object goes: stdout as it was when :func:`json_output` began.
_targets: list[TextIO] = []


def json_option(parser: Any) -> None:
    """Add --json to a parser or an argument group."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


@contextlib.contextmanager
def json_output(args: argparse.Namespace) -> Iterator[None]:
    """With --json, send what the command prints to stderr and keep stdout for :func:`emit`."""
    if not getattr(args, "json", False):
        yield
        return
    target = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        _targets.append(target)
        try:
            yield
        finally:
            _targets.pop()


def plain(value: Any) -> Any:
    """``value`` in JSON types, NaN and infinities as None.

    numpy and torch scalars and arrays become numbers and lists, paths strings.
    """
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy or torch scalar, tensor
        return plain(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def emit(args: argparse.Namespace, payload: Mapping[str, Any]) -> None:
    """Print the command's JSON object on stdout when --json was given (else nothing).

    ``payload`` holds the command's keys; ``command`` and ``curvscope_version`` come first.
    """
    if not getattr(args, "json", False):
        return
    record = {"command": args.command, "curvscope_version": __version__, **payload}
    target = _targets[-1] if _targets else sys.stdout
    print(json.dumps(plain(record), allow_nan=False), file=target, flush=True)


def problem_fields(problem: Any, op: Any) -> dict[str, Any]:
    """What a command measured: the problem's import paths and settings and the operator's size.

    Keys: ``model``, ``data``, ``loss`` (as given or defaulted), ``params`` (None: all
    trainable), ``operator`` (class name), ``n`` (parameters analysed), ``num_samples``,
    ``dtype`` and ``device`` of the products, ``seed``.
    """
    spec = problem.spec
    return {
        "model": spec.model,
        "data": spec.data,
        "loss": spec.loss,
        "params": list(spec.params) if spec.params is not None else None,
        "operator": type(op).__name__,
        "n": int(op.num_params),
        "num_samples": op.num_samples,
        "dtype": str(op.dtype).replace("torch.", ""),
        "device": str(op.device),
        "seed": spec.seed,
    }


def model_fields(problem: Any, params: Any, num_samples: int | None) -> dict[str, Any]:
    """:func:`problem_fields` of a model without an operator (``track``, which trains it).

    ``n`` counts the trainable parameters (those named in ``params``, when given); ``dtype``
    and ``device`` are the products' (float64 on CPU, else the model's dtype, by default).
    """
    from ..operators.functional import default_dtype_for

    spec = problem.spec
    named = problem.model.named_parameters()
    chosen = [p for name, p in named if p.requires_grad and (not params or name in params)]
    device = problem.device or (chosen[0].device if chosen else torch.device("cpu"))
    dtype = problem.dtype
    if dtype is None and chosen:
        dtype = default_dtype_for(device, chosen[0].dtype)
    return {
        "model": spec.model,
        "data": spec.data,
        "loss": spec.loss,
        "params": list(params) if params else None,
        "operator": "HessianOperator",
        "n": sum(p.numel() for p in chosen),
        "num_samples": num_samples,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "device": str(device),
        "seed": spec.seed,
    }


def run_fields(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``run_dir``, ``steps`` and ``scalars`` (name -> one value per step) of a run folder.

    Read with :func:`~curvscope.tracking.load_run` only under --json (else empty).
    """
    if not getattr(args, "json", False):
        return {}
    from ..tracking import load_run

    tracked = load_run(run_dir, warn=False)
    return {"run_dir": run_dir, "steps": tracked.steps, "scalars": tracked.scalars}
