"""The tables of a report: eigenpairs, a trace, spectrum structures.

Eigenpairs with residuals, a trace with its standard error, and spectrum structures
(outliers, bulk edges, negative mass; :mod:`curvscope.analysis.structure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .page import Table, number, numbers


def eigenpairs_table(pairs: Any, caption: str = "Top eigenvalues") -> Table:
    """One row per eigenpair: index, eigenvalue, relative residual, converged.

    Args:
        pairs: :class:`~curvscope.linalg.Eigenpairs` (values, residuals, converged of shape
            (k,)).
        caption: Heading.
    """
    tol = pairs.meta.get("tol")
    rows = [
        (str(i + 1), number(value, 12), number(residual, 3), "yes" if ok else "NO")
        for i, (value, residual, ok) in enumerate(
            zip(pairs.values, pairs.residuals, pairs.converged, strict=True)
        )
    ]
    note = "residual: ||A u - lambda u|| / max(|lambda|, ||A||_est)"
    if tol is not None:
        note += f"; converged: residual <= tol = {number(tol, 3)}"
    if not all(pairs.converged):
        missed = int(len(pairs.converged) - sum(bool(c) for c in pairs.converged))
        note += f". {missed} pair(s) missed the tolerance: their eigenvalues are less accurate"
    head = ("#", "eigenvalue", "residual", "converged")
    return Table(head, rows, caption, numeric=frozenset({0, 1, 2}), note=note)


def trace_table(
    estimate: Any, n: int | None = None, symbol: str = "A", caption: str = "Trace"
) -> Table:
    """The estimate with its standard error, a 95% interval and tr/n.

    Args:
        estimate: :class:`~curvscope.linalg.TraceEstimate`.
        n: Dimension of the operator (for the mean eigenvalue tr/n), when known.
        symbol: The operator's letter ("H" for the Hessian).
        caption: Heading.
    """
    value, error = estimate.value, estimate.std_error
    rows = [
        (f"tr({symbol})", number(value, 8)),
        ("standard error", number(error, 3)),
        ("95% interval (± 1.96 standard errors)", _interval(value, 1.96 * error)),
    ]
    if n:
        rows.append((f"tr({symbol}) / n (mean eigenvalue)", number(value / n, 6)))
    rows.append(("stochastic samples", str(int(estimate.samples.size))))
    note = (
        "The standard error is the spread of the stochastic part over its samples; 0 when the "
        "low-rank part of Hutch++ was exact, NaN for a single sample."
    )
    return Table(("quantity", "value"), rows, caption, numeric=frozenset({1}), note=note)


def _interval(value: float, half: float) -> str:
    return f"[{number(value - half, 6)}, {number(value + half, 6)}]"


def structure_table(structure: Any, caption: str = "Spectrum structure") -> Table:
    """One structure as (quantity, value) rows.

    Args:
        structure: :class:`~curvscope.analysis.SpectrumStructure`.
        caption: Heading.
    """
    s = structure
    rows = [
        (
            "lambda_min, lambda_max (extreme Ritz values)",
            f"{number(s.lambda_min)}, {number(s.lambda_max)}",
        ),
        ("|lambda_min| / lambda_max", number(s.abs_min_over_max, 4)),
        ("bulk edges", f"[{number(s.bulk_min)}, {number(s.bulk_max)}]"),
        (f"outliers above the bulk ({s.num_outliers})", numbers(s.outliers)),
        (f"outliers below the bulk ({s.num_outliers_low})", numbers(s.outliers_low)),
        (f"negative mass below -{number(s.band, 3)} (resolved)", number(s.negative_mass_band, 4)),
        ("negative mass below 0", number(s.negative_mass, 4)),
    ]
    if s.num_unresolved:
        rows.append(
            (
                "unresolved Ritz values beyond the bulk",
                f"{s.num_unresolved} (mass {number(s.unresolved_mass, 3)}): more Lanczos steps "
                "would settle them",
            )
        )
    gap = s.params.get("gap_factor")
    note = (
        "Outliers: isolated eigenvalues separated from the bulk by a gap"
        + (f" of {number(gap, 3)} x the bulk width" if gap is not None else "")
        + " and seen by enough probes; the resolved negative mass leaves out the nodes within "
        "the quadrature's resolution of 0 (docs/structure.md)."
    )
    return Table(("quantity", "value"), rows, caption, note=note)


STRUCTURES_HEAD = (
    "",
    "n",
    "lambda_min",
    "lambda_max",
    "bulk edges",
    "neg. mass (resolved)",
    "neg. mass (< 0)",
    "outliers above",
    "outliers below",
)


def structures_table(
    structures: Mapping[str, Any],
    caption: str,
    first: str = "term",
    labels: Mapping[str, str] | None = None,
) -> Table:
    """Several structures, one row each.

    Args:
        structures: {name: SpectrumStructure}, in row order.
        caption: Heading.
        first: Heading of the name column.
        labels: Row names by name (default: the names).
    """
    rows = [
        (
            (labels or {}).get(name, name),
            f"{s.n:,}",
            number(s.lambda_min, 4),
            number(s.lambda_max, 4),
            f"[{number(s.bulk_min, 3)}, {number(s.bulk_max, 3)}]",
            number(s.negative_mass_band, 3),
            number(s.negative_mass, 3),
            f"{s.num_outliers}: {numbers(s.outliers, limit=4, digits=3)}",
            f"{s.num_outliers_low}: {numbers(s.outliers_low, limit=4, digits=3)}",
        )
        for name, s in structures.items()
    ]
    head = (first, *STRUCTURES_HEAD[1:])
    return Table(head, rows, caption, numeric=frozenset({1, 2, 3, 5, 6}))
