"""The text commands print: paths written, numbers, tables and spectrum structures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..linalg import SpectralDensity


def paths(*files: Path) -> str:
    """``a.npz, a.json``: the files a command wrote."""
    return ", ".join(str(p) for p in files)


def values(numbers: Sequence[float] | np.ndarray) -> str:
    """Eigenvalues with 6 significant digits, comma-separated."""
    return ", ".join(f"{v:.6g}" for v in numbers)


def short_values(numbers: Sequence[float] | np.ndarray, limit: int = 12) -> str:
    """``[3.2, 1.1, ...]``: the first ``limit`` numbers with 4 significant digits."""
    numbers = list(numbers)
    shown = ", ".join(f"{v:.4g}" for v in numbers[:limit])
    return f"[{shown}{', ...' if len(numbers) > limit else ''}]"


def two_digits(value: float) -> str:
    """Two significant digits, trailing zeros kept (a standard error): 0.2025 -> '0.20'."""
    return f"{value:#.2g}".rstrip(".")


def table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned columns as wide as their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    return "\n".join(
        indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    )


#: Columns of :func:`structure_row`.
STRUCTURE_HEAD = ("term", "lambda_min", "lambda_max", "bulk", "neg. mass", "outliers")


def structure_row(name: str, s: Any) -> tuple[str, ...]:
    """A SpectrumStructure as a row of :data:`STRUCTURE_HEAD`."""
    return (
        name,
        f"{s.lambda_min:.4g}",
        f"{s.lambda_max:.4g}",
        f"[{s.bulk_min:.3g}, {s.bulk_max:.3g}]",
        f"{s.negative_mass_band:.3f}",
        f"{s.num_outliers}+{s.num_outliers_low}",
    )


def structure_block(structure: Any, header: str) -> str:
    """A header line and a SpectrumStructure's summary, indented for a terminal."""
    lines = [f"  {header}"]
    lines += [f"    {line}" for line in structure.summary().splitlines()]
    return "\n".join(lines)


def structure_summary(density: SpectralDensity, gap_factor: float = 0.25) -> str:
    """The structure of a density as indented lines for a terminal.

    Runs :func:`~curvscope.analysis.spectrum_structure` (outliers, bulk edges, negative mass)
    on the stored quadrature; no operator products.

    Args:
        density: An SLQ result.
        gap_factor: Separating gap of an outlier, as a multiple of the bulk width.

    Returns:
        A header line and the structure's summary, each line indented by two spaces.
    """
    from ..analysis import spectrum_structure

    structure = spectrum_structure(density, gap_factor=gap_factor)
    return structure_block(structure, f"structure (gap factor {gap_factor:g})")
