"""Helpers shared by the spectrum-structure experiments (batchnorm_outliers.py,
class_structure.py, gradient_concentration.py): command line, threads, loss and accuracy of a
model without side effects, the top-C gradient overlap, and a printed table."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _reproduce import add_arguments, resolve
from threadpoolctl import threadpool_limits

from curvscope.analysis import GradientOverlap, full_gradient, gradient_overlap
from curvscope.linalg import Eigenpairs, top_eigenpairs

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def parse_args(description: str, name: str | None = None) -> argparse.Namespace:
    """``--threads`` for torch and numpy's BLAS (default 1: the figures in docs/ were made
    so, on a shared 2-core machine) and ``--out`` (default docs/figures); with ``name`` also
    the reproduction options ``--seeds``, ``--quick``, ``--summary`` (_reproduce.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out", type=Path, default=FIGURES, help="folder of the figures (default: docs/figures)"
    )
    if name is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if name is not None:
        resolve(args, name)
    torch.set_num_threads(args.threads)
    # numpy's BLAS too: the same thread count gives the same numbers, run after run.
    threadpool_limits(limits=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.started = time.perf_counter()
    return args


def loss_and_accuracy(op: Any) -> tuple[float, float]:
    """Mean loss and accuracy over an operator's data at its frozen parameters.

    Goes through the operator's functional copy, so BatchNorm running statistics of the
    model are not touched (a plain ``model(x)`` in train mode would update them).
    """
    total = correct = 0.0
    count = 0
    with torch.no_grad():
        for batch in op.source:
            outputs = op.function.outputs(batch)
            total += float(op.loss_fn(outputs, batch.targets)) * batch.size
            targets = batch.targets
            if targets.is_floating_point():
                targets = targets.argmax(dim=1)
            correct += float((outputs.argmax(dim=1) == targets).sum())
            count += batch.size
    return total / count, correct / count


def top_overlap(
    op: Any, k: int, tol: float, seed: int = 0, gradient: torch.Tensor | None = None
) -> tuple[GradientOverlap, Eigenpairs]:
    """Gradient overlap with the top-k eigenspace (full-data gradient unless given)."""
    pairs = top_eigenpairs(op, k=k, tol=tol, seed=seed)
    if gradient is None:
        gradient = full_gradient(op)
    return gradient_overlap(op, gradient, k=k, eigenpairs=pairs), pairs


def quantile(density: Any, q: float) -> float:
    """Smallest Ritz value at which the SLQ measure's cumulative mass reaches ``q``.

    A rule-free bulk edge: with q = 0.99 everything above it is at most 1% of the spectrum.
    """
    nodes, weights = density.flat()
    order = np.argsort(nodes)
    cumulative = np.cumsum(weights[order])
    return float(nodes[order][min(np.searchsorted(cumulative, q), nodes.size - 1)])


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table (also valid inside a Markdown code block)."""
    text = [[str(c) for c in head], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in text) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float, digits: int = 3) -> str:
    """A float with ``digits`` significant digits; NaN as '-'."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def elapsed(args: argparse.Namespace) -> str:
    return f"{time.perf_counter() - args.started:.0f} s"
