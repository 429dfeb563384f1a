"""Loggers: each Tracker snapshot sent on to TensorBoard, Weights & Biases or your own sink.

In any training loop (Lightning and Hugging Face callbacks pass ``loggers`` on too)::

    from curvscope.tracking import TensorBoardLogger, Tracker, WandbLogger

    loggers = [TensorBoardLogger("tb/mlp"), WandbLogger(project="mlp")]
    with Tracker("runs/mlp", loss_fn, data, "every:50", loggers=loggers) as tracker:
        for step in range(num_steps):
            ...
            tracker.step(step, model, optimizer, loss=loss)

After a snapshot is committed to the run folder, every logger's
``log_snapshot(step, scalars, results)`` is called with the snapshot's scalars (``scalars`` of
:class:`~curvscope.tracking.Snapshot`: "lambda_max", "trace", "loss", "lr", timings, ...)
and its result objects ("density" -> :class:`~curvscope.linalg.SpectralDensity`, "top" ->
:class:`~curvscope.linalg.Eigenpairs`, ...); :meth:`Tracker.close` calls each logger's
``close()``. Any object with these two methods is a logger (:class:`SnapshotLogger`).

The built-in loggers write every scalar under ``curvscope/`` (``curvscope/lambda_max``, ...)
at the snapshot's training step, except ``unix_time`` (both tools stamp their own wall time),
and each density as a histogram of its eigenvalues (:func:`density_histogram`) and, with
``images=True``, as the two-panel linear/log figure of :func:`curvscope.plot.plot_density`
(:func:`density_image`).

Failures (a logger never costs the run folder a snapshot): loggers are called after the snapshot
is committed, so the run folder has it whatever a logger does. A logger that raises before it
has once succeeded in this Tracker raises out of :meth:`Tracker.step` (after the other loggers
had their turn): a wrong folder, a missing login or a bug in your own logger shows at the first
snapshot. After that, a failure (a full disk, a lost connection) is logged as a warning to the
"curvscope.tracking" logger (with its traceback the first time) and training goes on. Under
torch.distributed only rank 0 calls the loggers.

Neither TensorBoard nor W&B is a dependency of curvscope: ``pip install 'curvscope[tensorboard]'``
or ``'curvscope[wandb]'``. Importing this module imports neither; building a logger imports its
package then, and raises an ``ImportError`` naming the extra to install when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..linalg import SpectralDensity

#: Scalars the built-in loggers leave out: the wall clock (TensorBoard and W&B stamp their own,
#: and float32 event files would round it to minutes).
UNLOGGED_SCALARS = frozenset({"unix_time"})


@runtime_checkable
class SnapshotLogger(Protocol):
    """What a :class:`~curvscope.tracking.Tracker` calls with each committed snapshot."""

    def log_snapshot(
        self, step: int, scalars: Mapping[str, Any], results: Mapping[str, Any]
    ) -> None:
        """Log one snapshot.

        Args:
            step: The training step of the snapshot.
            scalars: Name -> number (``scalars`` of :class:`~curvscope.tracking.Snapshot`);
                NaN for a value that could not be taken.
            results: Name -> result object (``results`` of :class:`~curvscope.tracking.Snapshot`).
        """

    def close(self) -> None:
        """Flush and release what the logger holds; called once by ``Tracker.close``."""


def logged_scalars(scalars: Mapping[str, Any], prefix: str = "curvscope") -> dict[str, float]:
    """``{"<prefix>/<name>": float(value)}`` of every scalar but :data:`UNLOGGED_SCALARS`."""
    head = f"{prefix}/" if prefix else ""
    return {
        f"{head}{name}": float(value)
        for name, value in scalars.items()
        if name not in UNLOGGED_SCALARS
    }


def densities(results: Mapping[str, Any]) -> Iterator[tuple[str, SpectralDensity]]:
    """(name, density) of every :class:`~curvscope.linalg.SpectralDensity` among ``results``."""
    for name, result in results.items():
        if isinstance(result, SpectralDensity) and np.isfinite(result.nodes).any():
            yield name, result


@dataclass(frozen=True)
class DensityHistogram:
    """An SLQ density's quadrature binned: about how many eigenvalues lie in each bin.

    Attributes:
        edges: Bin edges, evenly spaced over [lambda_min, lambda_max], shape (bins + 1,).
        counts: n times the quadrature weight in each bin, shape (bins,); sums to n.
        n: Dimension of the operator (the number of eigenvalues).
        total: Estimated sum of the eigenvalues, n times the quadrature's first moment (the
            trace).
        total_squares: Estimated sum of their squares, n times the second moment.
    """

    edges: np.ndarray
    counts: np.ndarray
    n: int
    total: float
    total_squares: float

    @property
    def minimum(self) -> float:
        """Smallest Ritz value (the first edge)."""
        return float(self.edges[0])

    @property
    def maximum(self) -> float:
        """Largest Ritz value (the last edge)."""
        return float(self.edges[-1])


def density_histogram(density: SpectralDensity, bins: int = 64) -> DensityHistogram:
    """The density's quadrature (Ritz nodes and weights, no smoothing) in ``bins`` even bins.

    Args:
        density: SLQ result with at least one finite node.
        bins: Number of bins over [lambda_min, lambda_max] (a single node: one bin of width 1
            around it, numpy's rule).

    Returns:
        :class:`DensityHistogram` whose counts sum to ``density.n``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    nodes, weights = density.flat()
    if nodes.size == 0:
        raise ValueError("the density has no finite Ritz node to bin")
    mass, edges = np.histogram(nodes, bins=bins, weights=weights)
    n = int(density.n)
    return DensityHistogram(
        edges=edges,
        counts=n * mass,
        n=n,
        total=n * float(np.sum(weights * nodes)),
        total_squares=n * float(np.sum(weights * nodes**2)),
    )


def density_image(
    density: SpectralDensity,
    top_eigenvalues: Sequence[float] | np.ndarray | None = None,
    title: str | None = None,
    dpi: int = 60,
) -> np.ndarray:
    """The figure of :func:`curvscope.plot.plot_density` (linear and log panels) as pixels.

    Args:
        density: SLQ result.
        top_eigenvalues: Eigenvalues to mark (the snapshot's "top" values).
        title: Figure title; default that of ``plot_density``.
        dpi: Pixels per inch of the 11 x 4 inch figure (60: 660 x 240 pixels).

    Returns:
        RGB pixels, shape (height, width, 3), uint8.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..plot import plot_density

    marks = None if top_eigenvalues is None else tuple(np.atleast_1d(top_eigenvalues).tolist())
    key = (marks, title, dpi)
    cached = _LAST_IMAGE.get("entry")
    if cached is not None and cached[0] is density and cached[1] == key:
        return cached[2].copy()  # TensorBoard and W&B loggers draw one snapshot once
    # Fixed margins: a constrained layout costs several times the drawing itself.
    figure = Figure(figsize=(11, 4), dpi=dpi)
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.13, top=0.84, wspace=0.22)
    axes = figure.subplots(1, 2)
    plot_density(density, top_eigenvalues=marks, ax=axes, num_points=2000)
    if title is not None:
        figure.suptitle(title)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    _LAST_IMAGE["entry"] = (density, key, pixels)
    return pixels.copy()


#: The last image drawn by :func:`density_image`: (density, settings, pixels).
_LAST_IMAGE: dict[str, tuple[SpectralDensity, Any, np.ndarray]] = {}


def _top_values(results: Mapping[str, Any]) -> np.ndarray | None:
    """The snapshot's top eigenvalues ("top" -> Eigenpairs), to mark on a density image."""
    values = getattr(results.get("top"), "values", None)
    return None if values is None else np.atleast_1d(np.asarray(values, dtype=np.float64))


def _image_title(name: str, step: int, density: SpectralDensity) -> str:
    return f"{name} at step {step}: n = {density.n:,}, {density.num_probes} probes (SLQ)"


# --------------------------------------------------------------------------------------------
# TensorBoard


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "TensorBoardLogger needs the tensorboard package: pip install 'curvscope[tensorboard]' "
            f"(or pip install tensorboard) [{error}]"
        ) from error
    return SummaryWriter


class TensorBoardLogger:
    """Write each snapshot into TensorBoard event files (``torch.utils.tensorboard``).

    Scalars go to ``<prefix>/<name>`` at the snapshot's step (TensorBoard stores them as float32),
    each density to the histogram ``<prefix>/<name>`` (:func:`density_histogram`: bucket counts
    are eigenvalue counts, ``num`` is n, ``sum`` the estimated trace) and, with ``images``, to
    the image ``<prefix>/<name>_plot`` (:func:`density_image`). Events are flushed after every
    snapshot. View with ``tensorboard --logdir DIR``.

    Args:
        log_dir: Folder of the event files (created when missing). Give this or ``writer``.
        writer: An open ``SummaryWriter`` to write into instead (flushed, not closed, by
            :meth:`close`: its owner closes it).
        prefix: Tag prefix.
        histograms: Log each density as a histogram.
        images: Log each density as a figure too (about 0.1 s of matplotlib per snapshot).
        bins: Histogram bins.

    Raises:
        ImportError: The tensorboard package is not installed.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        prefix: str = "curvscope",
        histograms: bool = True,
        images: bool = False,
        bins: int = 64,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError(
                "TensorBoardLogger needs a folder or a writer: pass log_dir=... (a folder for the "
                "event files) or writer=SummaryWriter(...), not both"
            )
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if log_dir is not None and Path(log_dir).exists() and not Path(log_dir).is_dir():
            raise ValueError(f"TensorBoardLogger: {str(log_dir)!r} is a file; choose a folder")
        self._own = writer is None
        self.writer = _summary_writer_class()(log_dir=str(log_dir)) if self._own else writer
        self.prefix = prefix
        self.histograms = histograms
        self.images = images
        self.bins = int(bins)

    @property
    def log_dir(self) -> str:
        """The folder the event files are written to."""
        return str(self.writer.get_logdir())

    def log_snapshot(
        self, step: int, scalars: Mapping[str, Any], results: Mapping[str, Any]
    ) -> None:
        """Write the snapshot's scalars, and its densities as histograms (and images)."""
        for tag, value in logged_scalars(scalars, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        for name, density in densities(results):
            tag = f"{self.prefix}/{name}" if self.prefix else name
            if self.histograms:
                histogram = density_histogram(density, self.bins)
                self.writer.add_histogram_raw(
                    tag,
                    min=histogram.minimum,
                    max=histogram.maximum,
                    num=histogram.n,
                    sum=histogram.total,
                    sum_squares=histogram.total_squares,
                    bucket_limits=histogram.edges[1:].tolist(),
                    bucket_counts=histogram.counts.tolist(),
                    global_step=step,
                )
            if self.images:
                pixels = density_image(
                    density, _top_values(results), _image_title(name, step, density)
                )
                self.writer.add_image(f"{tag}_plot", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Close the writer it opened (flush one it was given)."""
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"


# --------------------------------------------------------------------------------------------
# Weights & Biases


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "WandbLogger needs Weights & Biases: pip install 'curvscope[wandb]' "
            f"(or pip install wandb) [{error}]"
        ) from error
    return wandb


class WandbLogger:
    """Log each snapshot to a Weights & Biases run, offline unless asked otherwise.

    Every scalar goes to ``<prefix>/<name>`` with ``<prefix>/step`` (the training step) as its x
    axis (``define_metric``), each density as a ``wandb.Histogram`` of its eigenvalues
    (:func:`density_histogram`) and, with ``images``, as a ``wandb.Image``
    (:func:`density_image`).

    A run it starts is logged at ``step=`` the training step and finished by :meth:`close`.
    An existing ``run`` (e.g. Lightning's ``WandbLogger(...).experiment``) is logged with
    ``commit=False``, so the snapshot joins the row of the run's own next log and never moves
    the run's step counter; the run is left open (its owner finishes it).

    Args:
        project: W&B project of a run it starts.
        run: An existing run to log into instead (``wandb.init(...)``).
        mode: "offline" (the run stays in ``dir``; ``wandb sync`` uploads it later), "online"
            or "disabled". Default: ``WANDB_MODE`` when set, else "offline", so that nothing is
            sent over the network, and no login is asked for, unless you choose it.
        dir: Folder under which W&B keeps its ``wandb/`` files (default: ``WANDB_DIR`` or the
            working directory).
        name: Name of the run it starts.
        prefix: Key prefix.
        histograms: Log each density as a histogram.
        images: Log each density as an image too (about 0.1 s of matplotlib per snapshot).
        bins: Histogram bins (at most 512, W&B's limit).
        **init_options: More keyword arguments of ``wandb.init`` (``config``, ``tags``,
            ``group``, ...).

    Raises:
        ImportError: wandb is not installed.
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        run: Any = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        prefix: str = "curvscope",
        histograms: bool = True,
        images: bool = False,
        bins: int = 64,
        **init_options: Any,
    ) -> None:
        if not 1 <= bins <= 512:
            raise ValueError(f"bins must be in [1, 512] (W&B's limit), got {bins}")
        if run is not None and ((project, mode, dir, name) != (None,) * 4 or init_options):
            raise ValueError(
                "WandbLogger(run=...) logs into that run: leave out project, mode, dir, name and "
                "wandb.init options (they are the run's own)"
            )
        self.wandb = _import_wandb()
        self._own = run is None
        if self._own:
            mode = mode or os.environ.get("WANDB_MODE") or "offline"
            run = self.wandb.init(
                project=project,
                mode=mode,
                dir=None if dir is None else str(dir),
                name=name,
                **init_options,
            )
        self.run = run
        self.prefix = prefix
        self.histograms = histograms
        self.images = images
        self.bins = int(bins)
        self._step_key = f"{prefix}/step" if prefix else "step"
        self.run.define_metric(self._step_key)
        self.run.define_metric(f"{prefix}/*" if prefix else "*", step_metric=self._step_key)
        self._closed = False

    def log_snapshot(
        self, step: int, scalars: Mapping[str, Any], results: Mapping[str, Any]
    ) -> None:
        """Log the snapshot's scalars, and its densities as histograms (and images)."""
        data: dict[str, Any] = {self._step_key: step, **logged_scalars(scalars, self.prefix)}
        for name, density in densities(results):
            key = f"{self.prefix}/{name}" if self.prefix else name
            if self.histograms:
                histogram = density_histogram(density, self.bins)
                data[key] = self.wandb.Histogram(np_histogram=(histogram.counts, histogram.edges))
            if self.images:
                pixels = density_image(
                    density, _top_values(results), _image_title(name, step, density)
                )
                data[f"{key}_plot"] = self.wandb.Image(pixels, caption=f"step {step}")
        if self._own:
            self.run.log(data, step=step)
        else:
            self.run.log(data, commit=False)

    def close(self) -> None:
        """Finish the run it started (a run it was given stays open)."""
        if self._own and not self._closed:
            self._closed = True
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandbLogger(run={getattr(self.run, 'id', None)!r})"
