"""Figures of spectral results, drawn with matplotlib's object API (no pyplot, no display).

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the Agg renderer, so
they work on a machine without a display and never change the caller's pyplot state or
backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .linalg.density import SpectralDensity, ghorbani_variance

#: Floor of the log-scale panel: densities below it are drawn at it. PyHessian's density
#: plot (Yao et al. 2020) adds 1e-7 before its log plot; clipping at the same level keeps
#: the bulk's shape and leaves the empty gaps between outliers flat instead of -inf.
DENSITY_FLOOR = 1e-7


#: Panels of :func:`plot_density`: both side by side, or one of them.
PANELS = ("both", "linear", "log")


def plot_density(
    density: SpectralDensity | Sequence[SpectralDensity] | Mapping[str, SpectralDensity],
    path: str | os.PathLike[str] | None = None,
    top_eigenvalues: Sequence[float] | np.ndarray | None = None,
    sigma: float | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    *,
    labels: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    panels: str = "both",
    top_label: str = "top eigenvalues",
    floor: float = DENSITY_FLOOR,
    num_points: int = 10_000,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Plot one spectral density, or several overlaid, on a linear and on a log scale.

    As Ghorbani et al. 2019 draw them. Several densities (two checkpoints, the Hessian and
    the Gauss-Newton matrix, ...) share one grid and one kernel width, each in its own colour
    with its label in the legend, so that their shapes can be compared.

    Args:
        density: SLQ result (:func:`curvscope.spectral_density`), a sequence of them, or
            {label: result} (the keys are the labels).
        path: Save the figure there (PNG by default; the suffix picks the format).
        top_eigenvalues: Eigenvalues to mark with vertical dashed lines on every panel
            (e.g. ``top_eigenpairs(op, k).values``, or ``[density.lambda_max]``).
        sigma: Standard deviation of the Gaussian kernel, in eigenvalue units; default
            sqrt(1e-5 * max(1, lambda_max - lambda_min)) (Ghorbani et al. 2019), of the range
            of all densities together when there are several.
        ax: The axes to draw into, one per panel (two for "both": linear, then log); default
            a new figure, 11 x 4 inches for two panels.
        labels: Legend labels, one per density (default: the mapping's keys, else none for
            one density and "density 1", "density 2", ... for several).
        colors: Line colours, one per density (default: matplotlib's cycle C0, C1, ...).
        panels: "both" (linear and log side by side), "linear" or "log".
        top_label: Legend entry of the vertical lines.
        floor: Smallest density drawn on the log panel (default :data:`DENSITY_FLOOR`).
        num_points: Points of the evaluation grid over [lambda_min, lambda_max] plus margins.
        title: Figure title; default says n, probes and Lanczos steps (one density) or the
            labels (several).
        dpi: Resolution of the saved raster image.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: No density, labels or colours not one per density, an unknown
            ``panels``, ``ax`` not one axes per panel, or a floor that is not positive.
    """
    names, densities = _named_densities(density, labels)
    if colors is not None and len(colors) != len(densities):
        raise ValueError(f"colors must be one per density ({len(densities)}), got {len(colors)}")
    if panels not in PANELS:
        raise ValueError(f"panels must be one of {', '.join(PANELS)}, got {panels!r}")
    if floor <= 0:
        raise ValueError(f"floor must be positive for a log scale, got {floor}")
    kinds = ["linear", "log"] if panels == "both" else [panels]
    if ax is None:
        figure = Figure(figsize=(11 if len(kinds) == 2 else 7, 4), layout="constrained")
        axes = list(np.atleast_1d(figure.subplots(1, len(kinds))))
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) != len(kinds):
            what = "two axes (linear, log)" if len(kinds) == 2 else f"one axes ({panels})"
            raise ValueError(f"ax must be {what}, got {len(axes)}")
        figure = axes[0].get_figure()

    if len(densities) == 1:
        grid = densities[0].grid(num_points)
    else:
        low = min(d.lambda_min for d in densities)
        high = max(d.lambda_max for d in densities)
        if sigma is None:
            sigma = float(np.sqrt(ghorbani_variance(low, high)))
        margin = 5.0 * sigma
        grid = np.linspace(low - margin, high + margin, num_points)
    for i, (name, each) in enumerate(zip(names, densities, strict=True)):
        _, values = each.density(grid, sigma)
        color = colors[i] if colors is not None else f"C{i}"
        for panel, kind in zip(axes, kinds, strict=True):
            if kind == "linear":
                panel.plot(grid, values, color=color, linewidth=1.0, label=name)
            else:
                panel.semilogy(
                    grid, np.maximum(values, floor), color=color, linewidth=1.0, label=name
                )
    for panel, kind in zip(axes, kinds, strict=True):
        if kind == "linear":
            panel.set_ylabel("density")
        else:
            panel.set_ylabel(f"density (log scale, floor {floor:g})")
            panel.set_ylim(bottom=floor * 0.5)
        if len(kinds) == 2:
            panel.set_title(f"{kind} scale", fontsize="medium")

    marks = [] if top_eigenvalues is None else np.atleast_1d(np.asarray(top_eigenvalues, float))
    for panel in axes:
        panel.set_xlabel("eigenvalue")
        panel.grid(True, alpha=0.3, linestyle="--")
        for i, value in enumerate(marks):
            panel.axvline(
                value,
                color="C3" if len(densities) == 1 else "0.3",
                linestyle="--",
                linewidth=0.8,
                label=top_label if i == 0 else None,
            )
        if len(marks) or any(name is not None for name in names):
            panel.legend(loc="upper right", fontsize="small")
    if title is None:
        first = densities[0]
        hessian = first.meta.get("operator") == "HessianOperator"
        what = "Hessian eigenvalue" if hessian else "Eigenvalue"
        if len(densities) == 1:
            steps = int(np.max(first.num_steps)) if first.num_steps.size else 0
            title = (
                f"{what} density (SLQ): n = {first.n:,}, "
                f"{first.num_probes} probes x {steps} Lanczos steps"
            )
        else:
            title = f"Eigenvalue densities (SLQ): {', '.join(map(str, names))}"
    if ax is None:
        figure.suptitle(title)
    _save(figure, path, dpi)
    return figure


def _named_densities(
    density: SpectralDensity | Sequence[SpectralDensity] | Mapping[str, SpectralDensity],
    labels: Sequence[str] | None,
) -> tuple[list[str | None], list[SpectralDensity]]:
    """(labels, densities) of :func:`plot_density`'s first argument, checked."""
    if isinstance(density, SpectralDensity):
        densities = [density]
        default: list[str | None] = [None]
    elif isinstance(density, Mapping):
        densities = list(density.values())
        default = [str(key) for key in density]
    else:
        densities = list(density)
        default = [f"density {i}" for i in range(1, len(densities) + 1)]
    if not densities:
        raise ValueError("no densities to plot")
    bad = [type(d).__name__ for d in densities if not isinstance(d, SpectralDensity)]
    if bad:
        raise ValueError(f"densities must be SpectralDensity results, got {', '.join(bad)}")
    if labels is None:
        return default, densities
    if len(labels) != len(densities):
        raise ValueError(f"labels must be one per density ({len(densities)}), got {len(labels)}")
    return list(labels), densities


# --------------------------------------------------------------------------------------------
# Several densities side by side (curvscope decompose, blocks), and a gradient's overlap

#: Panel titles of the terms of the Hessian's decomposition H = G + (H - G), with G split into
#: Papyan's G0 + G1 + G2 + W (:mod:`curvscope.operators.class_structure`; ``curvscope
#: decompose``).
TERM_LABELS = {
    "hessian": "Hessian H",
    "ggn": "Gauss-Newton G",
    "residual": "residual H - G",
    "true_label": "G0: true-label means",
    "class_means": "G1: class means",
    "cross_class": "G2: cross-class",
    "within_class": "W: within-class",
}


def plot_densities(
    densities: Mapping[str, SpectralDensity],
    path: str | os.PathLike[str] | None = None,
    structures: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    convention: str = "ghorbani",
    columns: int | None = None,
    floor: float = DENSITY_FLOOR,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Densities side by side, one log-scale panel each, outliers and bulk edges marked.

    Args:
        densities: {name: SpectralDensity}, drawn in this order.
        path: Save the figure there (PNG by default).
        structures: {name: SpectrumStructure}; outliers are drawn as red dashed lines and the
            bulk edges as grey dotted lines.
        labels: Panel titles by name (default: the names), e.g. :data:`TERM_LABELS`.
        convention: Smoothing, "ghorbani" or "papyan"
            (:func:`~curvscope.analysis.smoothed_density`).
        columns: Panels per row (default: up to 3).
        floor: Smallest density drawn (the log scale needs a floor; :data:`DENSITY_FLOOR`).
        title: Figure title.
        dpi: Resolution of the saved image.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from .analysis import smoothed_density

    names = list(densities)
    if not names:
        raise ValueError("no densities to plot")
    columns = columns or min(3, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        density = densities[name]
        grid, values = smoothed_density(density, convention, num=4000)  # type: ignore[arg-type]
        ax.semilogy(grid, np.maximum(values, floor), color="C0", linewidth=1.0)
        ax.set_ylim(bottom=floor * 0.5)
        heading = (labels or {}).get(name, name)
        structure = (structures or {}).get(name)
        if structure is not None:
            heading += _mark_structure(ax, structure)
        ax.set_title(heading, fontsize="medium")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log)")
        ax.grid(True, alpha=0.3, linestyle="--")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    _save(figure, path, dpi)
    return figure


def _mark_structure(ax: Axes, structure: Any) -> str:
    """Draw a SpectrumStructure's outliers and bulk edges on ``ax``; the title's second line."""
    for i, value in enumerate(structure.outliers):
        ax.axvline(
            value, color="C3", linestyle="--", linewidth=0.7, label="outliers" if i == 0 else None
        )
    for value in structure.outliers_low:
        ax.axvline(value, color="C3", linestyle="--", linewidth=0.7)
    for i, edge in enumerate((structure.bulk_min, structure.bulk_max)):
        ax.axvline(
            edge, color="0.5", linestyle=":", linewidth=0.8, label="bulk edges" if i == 0 else None
        )
    ax.legend(loc="upper right", fontsize="x-small")
    line = f"\n{structure.num_outliers} outliers above the bulk"
    if structure.num_outliers_low:
        line += f", {structure.num_outliers_low} below"
    return line


def plot_overlap(result: Any, path: str | os.PathLike[str] | None = None, dpi: int = 150) -> Figure:
    """Per-eigenvector shares (u_i . g)^2 / ||g||^2 of a gradient, as bars.

    Args:
        result: A :class:`~curvscope.analysis.GradientOverlap` (k shares of an n-vector).
        path: Save the figure there.
        dpi: Resolution of the saved image.

    Returns:
        The ``matplotlib.figure.Figure``: one bar per eigenvector, largest eigenvalue first,
        and the share 1/n of a random direction.
    """
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    ax = figure.subplots()
    index = np.arange(1, result.k + 1)
    ax.bar(index, result.shares, color="C0")
    ax.axhline(1.0 / result.n, color="C3", linestyle="--", linewidth=0.8, label="random: 1/n each")
    ax.set_xlabel("eigenvector (by eigenvalue, largest first)")
    ax.set_ylabel("share of ||g||^2")
    ax.set_xticks(index)
    if result.k <= 12:
        ax.set_xticklabels(
            [f"{i}\n{v:.3g}" for i, v in zip(index, result.eigenvalues, strict=True)],
            fontsize="x-small",
        )
    ax.set_title(
        f"gradient in the top-{result.k} eigenspace: {result.overlap:.3f} of ||g||^2 "
        f"(random: {result.baseline:.2g})",
        fontsize="medium",
    )
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3, linestyle="--")
    _save(figure, path, dpi)
    return figure


# --------------------------------------------------------------------------------------------
# Training runs (curvscope.tracking.load_run): sharpness, density evolution, traces


def _series(run: Any, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of a run's scalar where it is finite, or None when it never is."""
    values = run.scalars.get(name)
    if values is None:
        return None
    mask = np.isfinite(values)
    if not mask.any():
        return None
    return np.asarray(run.steps)[mask], values[mask]


def _threshold_label(run: Any, threshold: np.ndarray, lr: np.ndarray | None) -> str:
    """Label of the threshold: "2/η" for plain GD, "c/η" for a constant c = threshold * lr.

    Otherwise "threshold".
    """
    if lr is not None and lr.size == threshold.size and lr.size:
        ratio = threshold * lr
        if np.allclose(ratio, ratio[0], rtol=1e-9):
            c = float(ratio[0])
            return "2/η" if abs(c - 2.0) < 1e-9 else f"{c:.4g}/η"
    return "stability threshold"


def _save(figure: Figure, path: str | os.PathLike[str] | None, dpi: int) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)


def _axes(ax: Any, count: int, figsize: tuple[float, float]) -> tuple[Figure, list[Axes], bool]:
    """(figure, axes, created) for ``count`` stacked panels, or the caller's axes."""
    if ax is None:
        figure = Figure(figsize=figsize, layout="constrained")
        axes = figure.subplots(count, 1, sharex=True, squeeze=False)[:, 0]
        return figure, list(axes), True
    axes = [ax] if isinstance(ax, Axes) else list(ax)
    if len(axes) != count:
        raise ValueError(f"ax must be {count} axes for this run, got {len(axes)}")
    return axes[0].get_figure(), axes, False


def plot_sharpness(
    run: Any,
    path: str | os.PathLike[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    *,
    label: str | None = None,
    color: str | None = None,
    show_loss: bool = True,
    show_others: bool = True,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Sharpness against the optimizer's stability threshold over the training steps.

    The sharpness is the "sharpness" scalar of the "stability" measurement (lambda_max(H) for
    SGD and momentum, the preconditioned lambda_max for Adam), else "lambda_max" of "top".
    The threshold is "stability_threshold" (2/eta for GD, 2(1+beta)/eta for heavy ball, ...),
    else 2/lr from the stored learning rate; it is drawn dashed in the same color. The
    edge of stability (Cohen et al. 2021) shows as the sharpness rising and then hovering at
    the dashed line.

    Args:
        run: A :class:`~curvscope.tracking.Run` (``curvscope.tracking.load_run(path)``).
        path: Save the figure there (the suffix picks the format).
        ax: One axes (sharpness only) or two (sharpness, loss) to draw into; several runs can
            share them. Default: a new figure with a loss panel when the run has "loss".
        label: Legend label of the sharpness line (default "λ_max" or "sharpness").
        color: Line color (default C0).
        show_loss: Add the loss panel (log scale) to a new figure when the run has "loss".
        show_others: Also draw lambda_2, ..., lambda_k of "top", thin and light.
        title: Figure title (new figures only).
        dpi: Resolution of the saved raster image.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: If the run has neither "sharpness" nor "lambda_max".
    """
    name = "sharpness" if _series(run, "sharpness") is not None else "lambda_max"
    sharp = _series(run, name)
    if sharp is None:
        raise ValueError(
            f"{run.path} has no 'sharpness' or 'lambda_max' series: track it with "
            "measurements=('top', 'stability')"
        )
    loss = _series(run, "loss") if show_loss else None
    if ax is None:
        count = 2 if loss is not None else 1
    else:
        count = 1 if isinstance(ax, Axes) else len(list(ax))
        if count not in (1, 2):
            raise ValueError(f"ax must be one axes (sharpness) or two (and loss), got {count}")
    figure, axes, created = _axes(ax, count, (8, 6 if count == 2 else 4))
    color = color or "C0"
    top = axes[0]
    default = "λ_max(H)" if name == "lambda_max" else "sharpness"
    top.plot(*sharp, color=color, linewidth=1.2, label=label or default)
    if show_others:
        k = 2
        while (other := _series(run, f"lambda_{k}")) is not None:
            top.plot(*other, color=color, linewidth=0.6, alpha=0.35)
            k += 1
    threshold = _series(run, "stability_threshold")
    lr = _series(run, "lr")
    if threshold is None and lr is not None:
        threshold = (lr[0], 2.0 / lr[1])
    if threshold is not None:
        steps, values = threshold
        lr_at = None
        if lr is not None and np.array_equal(lr[0], steps):
            lr_at = lr[1]
        text = _threshold_label(run, values, lr_at)
        suffix = f" ({label})" if label else ""
        top.plot(steps, values, color=color, linestyle="--", linewidth=1.0, label=text + suffix)
    top.set_ylabel("sharpness")
    top.grid(True, alpha=0.3, linestyle="--")
    top.legend(loc="best", fontsize="small")
    if count == 2:
        bottom = axes[1]
        if loss is None:
            loss = _series(run, "loss")
        if loss is not None:
            bottom.semilogy(*loss, color=color, linewidth=1.0, label=label)
        bottom.set_ylabel("training loss")
        bottom.grid(True, alpha=0.3, linestyle="--")
    axes[-1].set_xlabel("step")
    if created:
        figure.suptitle(title or "Sharpness and its stability threshold")
    _save(figure, path, dpi)
    return figure


def density_matrix(
    densities: Any,
    sigma: float | None = None,
    num_points: int = 600,
    high: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Smoothed densities of several SLQ results on one common grid.

    Args:
        densities: Sequence of :class:`~curvscope.linalg.SpectralDensity`.
        sigma: Kernel width; default Ghorbani et al.'s sqrt(1e-5 * max(1, range)) over the
            common range of all of them.
        num_points: Grid points.
        high: Extend the grid up to at least this eigenvalue (e.g. a threshold to draw).

    Returns:
        (grid (g,), values (S, g), sigma): the grid spans the smallest to the largest Ritz
        value of all densities (or ``high``) plus 5 sigma on each side.
    """
    densities = list(densities)
    if not densities:
        raise ValueError("no densities to draw")
    low = min(d.lambda_min for d in densities)
    high = max([d.lambda_max for d in densities] + ([] if high is None else [high]))
    if sigma is None:
        sigma = float(np.sqrt(1e-5 * max(1.0, high - low)))
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    values = np.stack([d.density(grid, sigma)[1] for d in densities])
    return grid, values, sigma


def plot_density_evolution(
    run: Any,
    path: str | os.PathLike[str] | None = None,
    ax: Axes | None = None,
    *,
    sigma: float | None = None,
    floor: float = DENSITY_FLOOR,
    num_points: int = 600,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """The Hessian eigenvalue density over training as a heat map on a log color scale.

    Every snapshot's :class:`~curvscope.linalg.SpectralDensity` (the "density" measurement)
    is smoothed with one common Gaussian width on one common eigenvalue grid; column s of the
    map is the density at snapshot s (x: training step, y: eigenvalue, color: density, log
    scale clipped below at ``floor``). The top eigenvalue ("lambda_max") and the stability
    threshold are drawn over it when the run has them.

    Args:
        run: A :class:`~curvscope.tracking.Run`.
        path: Save the figure there.
        ax: Axes to draw into (default: a new figure with a color bar).
        sigma: Kernel width in eigenvalue units (default: see :func:`density_matrix`).
        floor: Smallest density shown; lower values take the floor's color.
        num_points: Points of the eigenvalue grid.
        title: Figure title.
        dpi: Resolution of the saved raster image.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: If no snapshot of the run holds a density.
    """
    from matplotlib.colors import LogNorm

    if floor <= 0:
        raise ValueError(f"floor must be positive for a log scale, got {floor}")
    series = run.densities
    steps = np.array(list(series), dtype=np.int64)
    if steps.size == 0:
        raise ValueError(f"{run.path} has no densities: track it with the 'density' measurement")
    densities = [series[s] for s in steps]
    low = min(d.lambda_min for d in densities)
    high = max(d.lambda_max for d in densities)
    threshold = _series(run, "stability_threshold")
    if threshold is None and (lr := _series(run, "lr")) is not None:
        threshold = (lr[0], 2.0 / lr[1])
    # The threshold is drawn when it lies within half the spectrum's range above it: far above
    # (small learning rates) it would squash the map into a thin band.
    if threshold is not None and threshold[1].max() > high + 0.5 * (high - low):
        threshold = None
    above = None if threshold is None else 1.02 * float(threshold[1].max())
    grid, values, sigma = density_matrix(densities, sigma, num_points, high=above)
    values = np.maximum(values, floor)
    if ax is None:
        figure = Figure(figsize=(9, 5), layout="constrained")
        ax = figure.add_subplot()
        created = True
    else:
        figure, created = ax.get_figure(), False
    edges = _edges(steps)
    spacing = grid[1] - grid[0] if grid.size > 1 else 1.0
    rows = np.concatenate([grid - spacing / 2, [grid[-1] + spacing / 2]])
    mesh = ax.pcolormesh(
        edges,
        rows,
        values.T,
        norm=LogNorm(vmin=floor, vmax=float(values.max())),
        cmap="viridis",
        shading="flat",
    )
    figure.colorbar(mesh, ax=ax, label=f"density (log scale, floor {floor:g})")
    top = _series(run, "lambda_max")
    if top is not None:
        ax.plot(*top, color="white", linewidth=0.9, label="λ_max (top)")
    if threshold is not None:
        ax.plot(*threshold, color="C3", linestyle="--", linewidth=1.0, label="threshold")
    if top is not None or threshold is not None:
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(rows[0], rows[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    if created:
        figure.suptitle(
            title
            or f"Hessian eigenvalue density over training (SLQ, {steps.size} snapshots, "
            f"σ = {sigma:.3g})"
        )
    _save(figure, path, dpi)
    return figure


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around sorted steps: midpoints, and half a gap beyond each end."""
    steps = np.asarray(steps, dtype=float)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate(
        [[steps[0] - (middle[0] - steps[0])], middle, [steps[-1] + (steps[-1] - middle[-1])]]
    )


#: Panels of :func:`plot_traces`: (value, standard error, label).
TRACE_PANELS = (
    ("trace", "trace_std_error", "tr(H)"),
    ("ntk_trace", "ntk_trace_std_error", "tr(NTK)"),
    ("stochastic_K", None, "stochastic-edge K"),
)


def plot_traces(
    run: Any,
    path: str | os.PathLike[str] | None = None,
    ax: Sequence[Axes] | None = None,
    *,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """tr(H), tr(NTK) and the stochastic-edge K over training, whichever the run has.

    One panel per quantity present: the Hessian trace ("trace", with a band of +- 2 standard
    errors), the NTK trace ("ntk_trace", same), and K of Agarwala & Pennington 2024
    ("stochastic_K", with its small-eta form "stochastic_K_trace" dashed and K = 1 dotted).

    Args:
        run: A :class:`~curvscope.tracking.Run`.
        path: Save the figure there.
        ax: Axes to draw into, one per panel present (default: a new figure).
        title: Figure title.
        dpi: Resolution of the saved raster image.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: If the run has none of the three.
    """
    panels = [
        panel
        for panel in TRACE_PANELS
        if panel[0] in run.scalars and not np.isnan(run.scalars[panel[0]]).all()
    ]
    if not panels:
        raise ValueError(
            f"{run.path} has no 'trace', 'ntk_trace' or 'stochastic_K' series: track it with "
            "the 'trace', 'ntk' or 'stochastic_edge' measurement"
        )
    figure, axes, created = _axes(ax, len(panels), (8, 2.6 * len(panels) + 0.6))
    for panel, (name, error_name, label) in zip(axes, panels, strict=True):
        steps, values = _series(run, name) or (np.zeros(0, np.int64), np.zeros(0))
        panel.plot(steps, values, color="C0", linewidth=1.2, label=label)
        errors = run.scalars.get(error_name) if error_name else None
        if errors is not None:
            errors = errors[np.isin(run.steps, steps)]
            if np.isfinite(errors).all() and np.any(errors > 0):
                panel.fill_between(
                    steps,
                    values - 2 * errors,
                    values + 2 * errors,
                    color="C0",
                    alpha=0.2,
                    linewidth=0,
                    label="± 2 standard errors",
                )
        if name == "stochastic_K":
            unstable = np.asarray(run.steps)[np.isposinf(run.scalars[name])]
            if unstable.size:
                panel.plot(
                    unstable,
                    np.full(unstable.size, float(values.max()) if values.size else 1.0),
                    linestyle="none",
                    marker="x",
                    color="C3",
                    label="K = ∞ (some η λ (1 + 1/B) ≥ 2)",
                )
            approx = _series(run, "stochastic_K_trace")
            if approx is not None:
                panel.plot(*approx, color="C1", linestyle="--", linewidth=1.0, label="η tr(H) / 2B")
            panel.axhline(1.0, color="C3", linestyle=":", linewidth=1.0, label="K = 1")
        panel.set_ylabel(label)
        panel.grid(True, alpha=0.3, linestyle="--")
        panel.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    if created:
        figure.suptitle(title or "Traces over training")
    _save(figure, path, dpi)
    return figure
