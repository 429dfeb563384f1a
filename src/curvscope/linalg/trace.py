"""Stochastic trace estimators with standard errors: Hutchinson (1989) and Hutch++.

Hutch++ is Meyer, Musco, Musco & Woodruff 2021.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..results import ResultFile, environment_metadata, save_result
from .interface import LinearOperatorLike, apply_rows, as_operator, rademacher_rows

TraceMethod = Literal["hutchinson", "hutch++"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate.

    Attributes:
        value: Estimate of tr(A).
        std_error: Standard error of ``value`` (sample standard deviation of the stochastic
            part over sqrt(its probes)); 0 when the low-rank part was exact.
        samples: The stochastic part's per-probe values, shape (s,).
        meta: method, products, seed, versions, wall time.
    """

    value: float
    std_error: float
    samples: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (the per-probe samples) and ``path.json`` (value, std_error, meta)."""
        arrays = {"samples": self.samples}
        meta = {**self.meta, "value": self.value, "std_error": self.std_error, "kind": "Trace"}
        return save_result(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceEstimate:
        """Read an estimate written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                samples not a 1-D real array, value not a number, std_error not >= 0 or NaN
                (NaN: a single stochastic sample).
        """
        file = ResultFile(path, "Trace", "TraceEstimate.save")
        samples = file.array("samples", shape=(None,))
        value = file.number("value")
        std_error = file.number("std_error", minimum=0.0)
        return cls(value, std_error, samples, file.meta)


def _quadratic_forms(op: LinearOperatorLike, rows: torch.Tensor, block: int) -> torch.Tensor:
    """z_i^T A z_i for each row z_i of ``rows`` (k, n), ``block`` products per pass."""
    out = []
    for start in range(0, rows.shape[0], block):
        chunk = rows[start : start + block]
        out.append((apply_rows(op, chunk) * chunk).sum(dim=1))
    return torch.cat(out)


def trace(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    num_probes: int = 99,
    method: TraceMethod = "hutch++",
    seed: int = 0,
    block: int = 10,
) -> TraceEstimate:
    """Estimate tr(A) of a symmetric operator from ``num_probes`` products.

    Args:
        op: Symmetric operator (n, n) with ``matmat``, or a dense matrix.
        num_probes: Operator products spent in all. Hutch++ splits them in three equal
            parts: a sketch A S, the exact trace of A on its range Q, and Hutchinson on the
            rest (I - QQ^T) A (I - QQ^T), whose sample spread gives the standard error.
        method: "hutch++" (default; much lower variance when a few eigenvalues dominate, as
            in network Hessians) or "hutchinson" (Rademacher probes).
        seed: Seed of the Rademacher probes.
        block: Probes per ``matmat`` (one data pass each).

    Returns:
        :class:`TraceEstimate` with the value and its standard error.

    Example:
        With 3n products Hutch++'s sketch spans the whole space, so the estimate is exact:

        >>> import numpy as np
        >>> from curvscope import trace
        >>> estimate = trace(np.diag([1.0, 2.0, 3.0]), num_probes=9)
        >>> round(estimate.value, 6), estimate.std_error < 1e-12
        (6.0, True)
    """
    op = as_operator(op)
    n = op.shape[0]
    started = time.perf_counter()
    device = op.device
    if method == "hutchinson":
        if num_probes < 2:
            raise ValueError("hutchinson needs num_probes >= 2 for a standard error")
        samples = _quadratic_forms(op, rademacher_rows(num_probes, n, seed, device), block)
        exact_part = 0.0
    elif method == "hutch++":
        third = num_probes // 3
        if third < 2:
            raise ValueError("hutch++ needs num_probes >= 6 (three parts of at least 2)")
        probes = rademacher_rows(2 * third, n, seed, device)
        sketch = torch.cat(
            [apply_rows(op, probes[s : min(s + block, third)]) for s in range(0, third, block)]
        )
        Q = torch.linalg.qr(sketch.T).Q.T  # (third, n) orthonormal rows
        exact_part = float(_quadratic_forms(op, Q, block).sum())
        rest = probes[third:]
        rest = rest - (rest @ Q.T) @ Q
        samples = _quadratic_forms(op, rest, block)
    else:
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', not {method!r}")
    samples_np = samples.cpu().numpy()
    value = exact_part + float(samples_np.mean())
    std_error = float(samples_np.std(ddof=1) / np.sqrt(samples_np.size))
    meta = {
        **environment_metadata(),
        "method": method,
        "num_probes": num_probes,
        "num_products": num_probes if method == "hutchinson" else 3 * third,
        "seed": seed,
        "operator_dtype": str(op.dtype).replace("torch.", ""),
        "operator": type(op).__name__,
        "wall_time_s": time.perf_counter() - started,
    }
    return TraceEstimate(value, std_error, samples_np, meta)
