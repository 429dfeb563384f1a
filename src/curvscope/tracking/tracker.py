"""Snapshots of the curvature during training, from any PyTorch loop.

Three lines in a training loop::

    tracker = Tracker("runs/mlp", loss_fn, data, schedule="log:1:10000:10")
    for step in range(num_steps):
        ...                                   # forward, backward, optimizer.step()
        tracker.step(step, model, optimizer, loss=loss)

or ``with Tracker(...) as tracker:`` around the loop, which releases the run folder at the end.
Every due step builds a :class:`~curvscope.operators.HessianOperator` on the model as it is
(never modifying it), runs the chosen measurements, and commits one snapshot to the run folder
(:class:`~curvscope.tracking.store.RunStore`); :func:`~curvscope.tracking.load_run` reads
the series back.

Measurements are looked up by name in :data:`MEASUREMENTS`. A measurement is a callable

    measure(op, model, optimizer, tracker) -> (scalars, results)

``op`` is the snapshot's Hessian operator, ``tracker`` gives the settings (``top_k``,
``density_iters``, ``seed``, ``loss_fn``, ``data``, ``params``, ``dtype``, ...) and, in
``tracker.current``, what the measurements before it in this snapshot returned (name ->
(scalars, results)); so a stability measurement listed after "top" can reuse its eigenpairs.
``scalars`` maps names to numbers (they become columns of the series; names must not clash),
``results`` maps file stems to objects with ``save(path)`` (or dicts of arrays), written into
the snapshot folder. Other modules add measurements without editing this file::

    from curvscope.tracking import register_measurement

    @register_measurement("ntk")
    def ntk_trace(op, model, optimizer, tracker):
        ...
        return {"ntk_trace": value}, {}

    Tracker(..., measurements=("top", "ntk"))

A callable may also be passed directly in ``measurements`` (its ``__name__`` is its name), or a
``(name, callable)`` pair. A measurement that cannot be taken at some snapshot (Adam's
preconditioned sharpness before the optimizer's first step) raises :class:`MeasurementSkipped`
with the reason; the snapshot is then recorded without its scalars, with the reason in its notes
(see "Failures" in :class:`Tracker`).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis.density import spectrum_structure
from ..distributed import is_distributed, rank
from ..linalg import spectral_density, top_eigenpairs, trace
from ..operators import HessianOperator
from ..operators.functional import random_modules
from .schedule import Schedule
from .store import RunStore, _as_scalar

logger = logging.getLogger("curvscope.tracking")

Measurement = Callable[
    [HessianOperator, nn.Module, Any, "Tracker"], tuple[Mapping[str, Any], Mapping[str, Any]]
]

#: Registry of measurements by name; add entries with :func:`register_measurement`.
MEASUREMENTS: dict[str, Measurement] = {}

#: Key of the operator build among the things that have worked once (no measurement name).
_OPERATOR = "<operator>"


class MeasurementSkipped(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a measurement that cannot be taken at this snapshot, with the reason.

    Not an error: the Tracker records the snapshot without the measurement's scalars, stores
    ``{"status": "skipped", "reason": str(exception)}`` in the snapshot's notes
    (:attr:`Snapshot.notes`, :attr:`~curvscope.tracking.store.Run.notes`) and logs a warning.
    Example: Adam's preconditioned sharpness before the optimizer's first step, when Adam
    has no second-moment state yet.
    """


def register_measurement(name: str, fn: Measurement | None = None, replace: bool = False) -> Any:
    """Register ``fn`` as measurement ``name``; usable as ``@register_measurement("name")``.

    Args:
        name: Key used in ``Tracker(measurements=...)`` and as the result file stem.
        fn: ``fn(op, model, optimizer, tracker) -> (scalars, results)``.
        replace: Allow replacing an existing entry (otherwise a clash is an error).
    """

    def add(fn: Measurement) -> Measurement:
        if not callable(fn):
            raise TypeError(f"measurement {name!r} must be callable")
        if name in MEASUREMENTS and MEASUREMENTS[name] is not fn and not replace:
            raise ValueError(
                f"a measurement named {name!r} is already registered: pick another name or "
                "pass replace=True"
            )
        MEASUREMENTS[name] = fn
        return fn

    return add if fn is None else add(fn)


# --------------------------------------------------------------------------------------------
# Built-in measurements


@register_measurement("top")
def measure_top(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Tracker) -> Any:
    """Top ``tracker.top_k`` Hessian eigenpairs: lambda_max, lambda_2, ..., lambda_k."""
    k = min(tracker.top_k, op.shape[0] - 1)
    pairs = top_eigenpairs(op, k=k, tol=tracker.top_tol, seed=tracker.seed)
    scalars = {"lambda_max": float(pairs.values[0])}
    for i in range(1, pairs.values.size):
        scalars[f"lambda_{i + 1}"] = float(pairs.values[i])
    scalars["top_residual"] = float(np.max(pairs.residuals))
    scalars["top_products"] = int(pairs.meta.get("num_products", -1))
    if not tracker.save_vectors:
        pairs = replace(pairs, vectors=np.zeros((0, pairs.values.size)))
    return scalars, {"top": pairs}


@register_measurement("trace")
def measure_trace(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Tracker) -> Any:
    """Hutch++ estimate of tr(H) with its standard error."""
    estimate = trace(op, num_probes=tracker.trace_probes, seed=tracker.seed)
    return {"trace": estimate.value, "trace_std_error": estimate.std_error}, {"trace": estimate}


@register_measurement("density")
def measure_density(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Tracker) -> Any:
    """SLQ spectral density; scalars: its extreme Ritz values and two negative masses.

    - ``density_negative_mass_band``: the quadrature weight (share of eigenvalues) on Ritz
      nodes below ``-density_negative_band``, where the band is the quadrature's resolution,
      Papyan's kernel width in natural units, about 0.37 (lambda_max - lambda_min) / (M - 1)
      for M Lanczos steps: ``negative_mass_band`` and ``band`` of
      :func:`~curvscope.analysis.density.spectrum_structure`. This is the negative mass the
      quadrature can resolve, stable across probes and smooth over snapshots; it is printed.
    - ``density_negative_mass``: the raw weight on nodes below 0. A network's large
      near-null space is a point mass at 0 that Lanczos represents by nodes about one
      resolution to either side of 0, so this share swings with the probes (on a digits MLP
      trained with Adam: 0.27 to 0.49 over six probe seeds of one snapshot, where the
      resolved mass stays within 0.018 to 0.022; see docs/dynamics.md) and says little on
      its own.
    """
    density = spectral_density(
        op, num_iters=tracker.density_iters, num_probes=tracker.density_probes, seed=tracker.seed
    )
    nodes, weights = density.flat()
    structure = spectrum_structure(density)
    scalars = {
        "density_lambda_min": density.lambda_min,
        "density_lambda_max": density.lambda_max,
        "density_negative_mass": float(weights[nodes < 0].sum()),
        "density_negative_mass_band": structure.negative_mass_band,
        "density_negative_band": structure.band,
    }
    return scalars, {"density": density}


# --------------------------------------------------------------------------------------------
# The tracker


class _Current(dict[str, tuple[dict[str, Any], dict[str, Any]]]):
    """``tracker.current``: name -> (scalars, results); looking up a measurement that was
    skipped or failed at this snapshot raises :class:`MeasurementSkipped`, so a measurement
    that needs it is skipped with the reason instead of failing with a ``KeyError``."""

    def __init__(self, notes: Mapping[str, Mapping[str, str]]) -> None:
        super().__init__()
        self.notes = notes

    def __missing__(self, name: str) -> Any:
        note = self.notes.get(name)
        if note is None:
            raise KeyError(name)
        raise MeasurementSkipped(
            f"it needs {name!r}, which was {note['status']} at this snapshot ({note['reason']})"
        )


@dataclass(frozen=True)
class Snapshot:
    """What one due :meth:`Tracker.step` measured and committed.

    Attributes:
        step: The training step.
        scalars: Every number written for the step (measurements, times, loss, lr, extras).
        results: Result objects by name ("top" -> Eigenpairs, "trace" -> TraceEstimate,
            "density" -> SpectralDensity, ...).
        path: The committed snapshot folder.
        notes: Measurement name -> ``{"status": "skipped" | "failed", "reason": ...}`` for the
            measurements that recorded nothing at this step (empty when all did).
    """

    step: int
    scalars: dict[str, float]
    results: dict[str, Any] = field(repr=False)
    path: Path
    notes: dict[str, dict[str, str]] = field(default_factory=dict)


class Tracker:
    """Measure the Hessian of a model on a schedule during training and store the series.

    Args:
        run_dir: Run folder (see :class:`~curvscope.tracking.store.RunStore`). Under
            torch.distributed rank 0 writes it and rank R > 0 writes ``<run_dir>.rank<R>``
            (the same numbers; data should be each rank's shard, e.g. ``Shard(batches)``).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss of a batch.
        data: Re-iterable of batches (list or non-shuffling DataLoader) defining the loss
            whose Hessian is measured; the same every snapshot.
        schedule: A :class:`Schedule`, a spec ("every:50", "log:1:10000:10", "steps:0,10"),
            an int k (every k steps) or a list of steps.
        measurements: Names in :data:`MEASUREMENTS` ("top", "trace", "density", or any
            registered later), callables, or ``(name, callable)`` pairs; run in this order.
        top_k: Eigenpairs of "top".
        top_tol: Relative residual of "top".
        density_iters: Lanczos steps per probe of "density".
        density_probes: Probes of "density".
        trace_probes: Products of the Hutch++ "trace".
        seed: Seed of every random start vector; the same at every snapshot (common random
            numbers make the series smoother than independent draws would).
        params: Parameters to analyse (names or tensors); default all trainable.
        dtype: Product dtype; default float64 on CPU (see HessianOperator).
        progress: Print one line per snapshot with ``tqdm.write`` (the line is always logged
            to the "curvscope.tracking" logger at INFO).
        resume: Continue an existing run folder: steps already committed are skipped.
        extra: JSON-able user metadata stored in ``run.json`` (must match on resume).
        save_vectors: Store the eigenvectors of "top" (n x k float64 per snapshot).
        operator_options: More keyword arguments of HessianOperator (``keep_graphs``,
            ``allow_tf32``, ``unpack_batch``, ``device``, ``matmat_mode``,
            ``check_determinism``).
        eval_mode: Measure with every module in eval mode (dropout off, BatchNorm on its
            running statistics), for models that train with dropout: their train-mode loss
            is random, so its Hessian is refused. Each module's own mode is restored after
            the snapshot. Default False: the model is measured in the mode it is in.

    Failures (one measurement never ends a training run, a mistake shows at once):

    - A measurement that raises :class:`MeasurementSkipped` (e.g. "stability" with Adam
      before its first step) is left out of that snapshot: a warning is logged and the
      reason is stored as the snapshot's note ``{"status": "skipped", "reason": ...}``.
    - A measurement that raises any other ``Exception`` *before it has once succeeded in
      this Tracker* propagates: a bad ``loss_fn``, a missing optimizer, a misspelt setting
      or a bug in a plug-in shows at the first snapshot (usually step 0), before training
      time is spent. The same holds for building the Hessian operator (e.g. a model with
      dropout in train mode without ``eval_mode=True``) until it has been built once.
    - After that, an ``Exception`` (a numerical failure, out of memory, a later change of
      the model) is recorded instead: the snapshot is written with the other measurements,
      the failed one's note is ``{"status": "failed", "reason": "<Type>: <message>"}``, and
      the error is logged with its traceback. If the operator itself cannot be built, every
      measurement is recorded as failed and the user's scalars are still written.
    - Under torch.distributed failures always propagate: a rank that stopped in the middle
      of a measurement would leave the ranks' collective operations mismatched.
    - ``KeyboardInterrupt`` and other non-``Exception`` errors always propagate.

    A measurement that needs another one (``tracker.current``) is skipped when that one was
    skipped or failed at the snapshot.

    Attributes:
        store: The :class:`RunStore`.
        current: During a snapshot, name -> (scalars, results) of the measurements done so far.
        current_notes: During a snapshot, name -> note of the measurements skipped or failed
            so far.
        last: The last :class:`Snapshot` written in this session (None before).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Iterable[Any],
        schedule: Schedule | str | int | Iterable[int] = "every:100",
        measurements: Sequence[str | Measurement | tuple[str, Measurement]] = (
            "top",
            "trace",
            "density",
        ),
        top_k: int = 1,
        top_tol: float = 1e-6,
        density_iters: int = 80,
        density_probes: int = 5,
        trace_probes: int = 60,
        seed: int = 0,
        params: Any = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        resume: bool = False,
        extra: Mapping[str, Any] | None = None,
        save_vectors: bool = False,
        operator_options: Mapping[str, Any] | None = None,
        eval_mode: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar")
        self.loss_fn = loss_fn
        self.data = data
        self.schedule = Schedule.coerce(schedule)
        self.measurements = _resolve(measurements)
        self.top_k = int(top_k)
        self.top_tol = float(top_tol)
        self.density_iters = int(density_iters)
        self.density_probes = int(density_probes)
        self.trace_probes = int(trace_probes)
        self.seed = int(seed)
        self.params = params
        self.dtype = dtype
        self.progress = progress
        self.save_vectors = bool(save_vectors)
        self.operator_options = dict(operator_options or {})
        self.eval_mode = bool(eval_mode)
        if self.top_k < 1 or self.density_iters < 1 or self.density_probes < 1:
            raise ValueError("top_k, density_iters and density_probes must be >= 1")
        self.config = {
            "schedule": self.schedule.spec,
            "measurements": list(self.measurements),
            "top_k": self.top_k,
            "top_tol": self.top_tol,
            "density_iters": self.density_iters,
            "density_probes": self.density_probes,
            "trace_probes": self.trace_probes,
            "seed": self.seed,
            "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "params": None if params is None else [_param_label(p) for p in params],
            "save_vectors": self.save_vectors,
            "extra": dict(extra or {}),
        }
        if self.eval_mode:  # only when set, so runs written before the option still resume
            self.config["eval_mode"] = True
        self.store = RunStore(_rank_run_dir(run_dir), config=self.config, resume=resume)
        for problem in self.store.problems:
            logger.warning("run folder: %s", problem)
        self.current: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.current_notes: dict[str, dict[str, str]] = {}
        self.last: Snapshot | None = None
        self._written: set[int] = set()
        self._succeeded: set[str] = set()  # measurements (and _OPERATOR) that worked once

    @property
    def run_dir(self) -> Path:
        return self.store.path

    @property
    def completed_steps(self) -> set[int]:
        """Steps with a committed snapshot (from earlier sessions too)."""
        return self.store.completed_steps

    def due(self, step: int) -> bool:
        """True when ``step`` is scheduled and not yet in the run."""
        return self.schedule.due(step) and step not in self.store.completed_steps

    def step(
        self, step: int, model: nn.Module, optimizer: Any = None, **scalars: Any
    ) -> Snapshot | None:
        """Take a snapshot at ``step`` if one is due; otherwise return None at once.

        Args:
            step: Training step (an int >= 0, e.g. optimizer steps taken so far).
            model: The model at this step; read, never modified (parameters, buffers, grads,
                requires_grad, train/eval modes and the global RNG state are left as found).
            optimizer: If given, ``optimizer.param_groups[0]["lr"]`` is stored as "lr".
            **scalars: More numbers to store with the snapshot, e.g. ``loss=loss`` (a
                tensor is read with ``.item()``).

        Returns:
            The :class:`Snapshot` written, or None when the step is not due or was committed
            before (a resumed run skips its completed steps).
        """
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"step must be an integer, got {step!r}") from None
        if not self.schedule.due(step):
            return None
        if step in self.store.completed_steps:
            if step in self._written:
                logger.debug("step %d already has a snapshot in this run; skipped", step)
            return None
        started = time.perf_counter()
        user = {key: _as_scalar(key, value) for key, value in scalars.items()}
        row: dict[str, Any] = {}
        if optimizer is not None:
            row["lr"] = _read_lr(optimizer)
        results: dict[str, Any] = {}
        notes: dict[str, dict[str, str]] = {}
        self.current, self.current_notes = _Current(notes), notes
        try:
            with _preserved_random_state(), _modes_restored(model, self.eval_mode):
                op = self._build_operator(step, model, notes)
                if op is not None:
                    row["num_params"] = op.shape[0]
                    for name, measure in self.measurements.items():
                        self._measure(step, name, measure, op, model, optimizer, row, results)
        finally:
            self.current, self.current_notes = {}, {}
        for key, value in user.items():
            if key in row or key == "step":
                raise ValueError(
                    f"scalar {key!r} clashes with a measured one: pass it under another name"
                )
            row[key] = value
        row["time_total_s"] = time.perf_counter() - started
        row["unix_time"] = time.time()
        path = self.store.write_snapshot(step, row, results, notes=notes)
        self._written.add(step)
        written = {name: _plain(value) for name, value in row.items()}
        self.last = Snapshot(step, written, results, path, notes)
        self._report(self.last)
        return self.last

    def _build_operator(
        self, step: int, model: nn.Module, notes: dict[str, dict[str, str]]
    ) -> HessianOperator | None:
        """The snapshot's Hessian operator; None (every measurement noted as failed) when it
        cannot be built at a later snapshot (see "Failures" in the class docstring)."""
        try:
            try:
                op = HessianOperator(
                    model,
                    self.loss_fn,
                    self.data,
                    params=self.params,
                    dtype=self.dtype,
                    **self.operator_options,
                )
            except ValueError as error:
                raise self._tracker_advice(model, error) from error
        except Exception as error:
            if not self._may_record(_OPERATOR, step, error):
                raise
            reason = f"the Hessian operator could not be built: {_reason(error)}"
            logger.error("step %d: %s (recorded; training goes on)", step, reason, exc_info=error)
            for name in self.measurements:
                notes[name] = {"status": "failed", "reason": reason}
            return None
        self._succeeded.add(_OPERATOR)
        return op

    def _tracker_advice(self, model: nn.Module, error: ValueError) -> ValueError:
        """The operator's refusal of a random (train-mode) model, with the Tracker's remedy."""
        if self.eval_mode:
            return error
        random = random_modules(model)
        if random:
            return ValueError(
                f"modules {random} are random in train mode, which makes the curvature random: "
                "pass Tracker(..., eval_mode=True) to measure every snapshot in eval mode "
                "(dropout off, BatchNorm on its running statistics; each module gets its own "
                "mode back after the snapshot, so training is unchanged), or set their p=0"
            )
        if "model.eval()" in str(error):
            return ValueError(
                f"{error} (in a Tracker, rather than calling model.eval(), pass "
                "Tracker(..., eval_mode=True): it measures in eval mode and gives every module "
                "its own mode back after each snapshot)"
            )
        return error

    def _measure(
        self,
        step: int,
        name: str,
        measure: Measurement,
        op: HessianOperator,
        model: nn.Module,
        optimizer: Any,
        row: dict[str, Any],
        results: dict[str, Any],
    ) -> None:
        """Run one measurement into ``row`` and ``results``, or note why it recorded nothing."""
        notes = self.current_notes
        begun = time.perf_counter()
        try:
            values, files = measure(op, model, optimizer, self)
            values, files = dict(values), dict(files)
            for key in values:
                if key in row:
                    raise ValueError(f"measurement {name!r} repeats the scalar {key!r}")
            for key in files:
                if key in results:
                    raise ValueError(f"measurement {name!r} repeats the result {key!r}")
        except MeasurementSkipped as skip:
            notes[name] = {"status": "skipped", "reason": str(skip)}
            logger.warning("step %d: measurement %r skipped: %s", step, name, skip)
            return
        except Exception as error:
            if not self._may_record(name, step, error):
                raise
            notes[name] = {"status": "failed", "reason": _reason(error)}
            logger.error(
                "step %d: measurement %r failed (recorded; training goes on): %s",
                step,
                name,
                _reason(error),
                exc_info=error,
            )
            return
        finally:
            row[f"time_{name}_s"] = time.perf_counter() - begun
        self._succeeded.add(name)
        row.update(values)
        results.update(files)
        self.current[name] = (values, files)

    def _may_record(self, name: str, step: int, error: Exception) -> bool:
        """Whether ``error`` of ``name`` is recorded (True) or must propagate (False)."""
        if name in self._succeeded and not is_distributed():
            return True
        what = "the Hessian operator" if name == _OPERATOR else f"measurement {name!r}"
        if name not in self._succeeded:
            error.add_note(
                f"curvscope: {what} failed at step {step} before it had once succeeded in this "
                "Tracker, so the error is raised (later failures are recorded in the "
                "snapshot's notes and training goes on)"
            )
        else:
            error.add_note(
                f"curvscope: {what} failed at step {step}; under torch.distributed a failure "
                "is raised, since the ranks' collective operations would no longer match"
            )
        return False

    def _report(self, snapshot: Snapshot) -> None:
        line = format_line(snapshot.step, snapshot.scalars, snapshot.notes)
        logger.info(line)
        if self.progress:
            try:
                from tqdm import tqdm

                tqdm.write(line)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                print(line)

    def close(self) -> None:
        """Release the run folder (every snapshot is already committed)."""
        self.store.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Tracker({str(self.run_dir)!r}, schedule={self.schedule.spec!r}, "
            f"measurements={list(self.measurements)})"
        )


def format_line(
    step: int, scalars: Mapping[str, Any], notes: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """One progress line of a snapshot.

    ``step 120  loss 0.41  lambda_max 3.21  trace 45.1 ± 0.8  neg mass 0.012 < -0.0031  (2.1 s)``.
    "neg mass W < -B" is ``density_negative_mass_band``: the share of eigenvalues the SLQ
    quadrature puts below -B, where B (``density_negative_band``) is the quadrature's
    resolution (see :func:`measure_density`); the raw share below 0 is not printed because a
    near-null space makes it swing between snapshots. Measurements with a note are listed at
    the end: "[skipped: stability]", "[failed: trace]".
    """
    parts = [f"step {step}"]
    if "loss" in scalars:
        parts.append(f"loss {_fmt(scalars['loss'])}")
    if "lambda_max" in scalars:
        parts.append(f"lambda_max {_fmt(scalars['lambda_max'])}")
    if "trace" in scalars:
        error = scalars.get("trace_std_error")
        suffix = f" ± {_fmt(error)}" if error is not None else ""
        parts.append(f"trace {_fmt(scalars['trace'])}{suffix}")
    if "density_negative_mass_band" in scalars:
        band = scalars.get("density_negative_band")
        suffix = f" < -{_fmt(band)}" if band is not None else ""
        parts.append(f"neg mass {_fmt(scalars['density_negative_mass_band'])}{suffix}")
    if "time_total_s" in scalars:
        parts.append(f"({scalars['time_total_s']:.2f} s)")
    for status in ("skipped", "failed"):
        names = [name for name, note in (notes or {}).items() if note.get("status") == status]
        if names:
            parts.append(f"[{status}: {', '.join(names)}]")
    return "  ".join(parts)


def _reason(error: BaseException) -> str:
    """``"<Type>: <message>"`` of an exception, for a snapshot's note."""
    return f"{type(error).__name__}: {error}"


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_lr(optimizer: Any) -> float:
    try:
        lr = optimizer.param_groups[0]["lr"]
    except (AttributeError, IndexError, KeyError, TypeError):
        raise TypeError(
            "optimizer has no param_groups[0]['lr']: pass a torch.optim optimizer, or leave "
            "optimizer out and pass lr=... as a scalar"
        ) from None
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _param_label(param: Any) -> str:
    if isinstance(param, str):
        return param
    shape = tuple(getattr(param, "shape", ()))
    return f"tensor{list(shape)}"


def _resolve(
    measurements: Sequence[str | Measurement | tuple[str, Measurement]],
) -> dict[str, Measurement]:
    if isinstance(measurements, str):
        measurements = [measurements]
    resolved: dict[str, Measurement] = {}
    for entry in measurements:
        if isinstance(entry, str):
            if entry not in MEASUREMENTS:
                raise ValueError(
                    f"unknown measurement {entry!r}: registered are {sorted(MEASUREMENTS)} "
                    "(add one with curvscope.tracking.register_measurement)"
                )
            name, fn = entry, MEASUREMENTS[entry]
        elif isinstance(entry, tuple) and len(entry) == 2:
            name, fn = entry
        elif callable(entry):
            name, fn = getattr(entry, "__name__", type(entry).__name__), entry
        else:
            raise TypeError(
                f"a measurement is a name, a callable or (name, callable), not {entry!r}"
            )
        if name in resolved:
            raise ValueError(f"measurement {name!r} is listed twice")
        resolved[name] = fn
    if not resolved:
        raise ValueError("measurements is empty: name at least one, e.g. ('top',)")
    return resolved


def _rank_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` itself, or ``<run_dir>.rank<R>`` for ranks R > 0 of a process group.

    Under torch.distributed every rank measures the same numbers (the products are
    all-reduced), and every rank must take the same snapshots; each keeps its own crash-safe
    store so that no two processes write one folder and each resumes on its own.
    """
    path = Path(run_dir)
    if is_distributed() and rank() > 0:
        return path.with_name(f"{path.name}.rank{rank()}")
    return path


@contextlib.contextmanager
def _modes_restored(model: nn.Module, to_eval: bool) -> Iterator[None]:
    """Put every module in eval mode for the block (if ``to_eval``), then give each module
    back its own training flag (a model may mix modes, e.g. a frozen BatchNorm)."""
    if not to_eval:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Leave the global torch (CPU and CUDA) and numpy RNG states as they were."""
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    numpy_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
