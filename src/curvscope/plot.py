"""Figures of spectral results, drawn with matplotlib's object API (no pyplot, no display).

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the Agg renderer, so
they work on a machine without a display and never change the caller's pyplot state or
backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .linalg.density import SpectralDensity

#: Floor of the log-scale panel: densities below it are drawn at it. PyHessian's density
#: plot (Yao et al. 2020) adds 1e-7 before its log plot; clipping at the same level keeps
#: the bulk's shape and leaves the empty gaps between outliers flat instead of -inf.
DENSITY_FLOOR = 1e-7


def plot_density(
    density: SpectralDensity,
    path: str | os.PathLike[str] | None = None,
    top_eigenvalues: Sequence[float] | np.ndarray | None = None,
    sigma: float | None = None,
    ax: Sequence[Axes] | None = None,
    *,
    top_label: str = "top eigenvalues",
    floor: float = DENSITY_FLOOR,
    num_points: int = 10_000,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Plot a spectral density on a linear and on a log scale, as Ghorbani et al. 2019 do.

    Args:
        density: SLQ result (:func:`curvscope.spectral_density`).
        path: Save the figure there (PNG by default; the suffix picks the format).
        top_eigenvalues: Eigenvalues to mark with vertical dashed lines on both panels
            (e.g. ``top_eigenpairs(op, k).values``, or ``[density.lambda_max]``).
        sigma: Standard deviation of the Gaussian kernel, in eigenvalue units; default
            sqrt(1e-5 * max(1, lambda_max - lambda_min)) (Ghorbani et al. 2019).
        ax: Two axes (linear panel, log panel) to draw into; default a new 11 x 4 inch
            figure with two panels side by side.
        top_label: Legend entry of the vertical lines.
        floor: Smallest density drawn on the log panel (default :data:`DENSITY_FLOOR`).
        num_points: Points of the evaluation grid over [lambda_min, lambda_max] plus margins.
        title: Figure title; default says n, probes and Lanczos steps.
        dpi: Resolution of the saved raster image.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    if floor <= 0:
        raise ValueError(f"floor must be positive for a log scale, got {floor}")
    if ax is None:
        figure = Figure(figsize=(11, 4), layout="constrained")
        axes = figure.subplots(1, 2)
    else:
        axes = list(ax)
        if len(axes) != 2:
            raise ValueError(f"ax must be two axes (linear, log), got {len(axes)}")
        figure = axes[0].get_figure()

    grid, values = density.density(density.grid(num_points), sigma)
    linear, log = axes
    linear.plot(grid, values, color="C0", linewidth=1.0)
    linear.set_ylabel("density")
    log.semilogy(grid, np.maximum(values, floor), color="C0", linewidth=1.0)
    log.set_ylabel(f"density (log scale, floor {floor:g})")
    log.set_ylim(bottom=floor * 0.5)

    marks = [] if top_eigenvalues is None else np.atleast_1d(np.asarray(top_eigenvalues, float))
    for panel in axes:
        panel.set_xlabel("eigenvalue")
        panel.grid(True, alpha=0.3, linestyle="--")
        for i, value in enumerate(marks):
            panel.axvline(
                value,
                color="C3",
                linestyle="--",
                linewidth=0.8,
                label=top_label if i == 0 else None,
            )
        if len(marks):
            panel.legend(loc="upper right", fontsize="small")
    linear.set_title("linear scale", fontsize="medium")
    log.set_title("log scale", fontsize="medium")
    if title is None:
        steps = int(np.max(density.num_steps)) if density.num_steps.size else 0
        what = (
            "Hessian eigenvalue"
            if density.meta.get("operator") == "HessianOperator"
            else "Eigenvalue"
        )
        title = (
            f"{what} density (SLQ): n = {density.n:,}, "
            f"{density.num_probes} probes x {steps} Lanczos steps"
        )
    if ax is None:
        figure.suptitle(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    return figure
