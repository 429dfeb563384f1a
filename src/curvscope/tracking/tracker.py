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

Measurements are looked up by name in :data:`~curvscope.tracking.measurements.MEASUREMENTS`
(the built-ins "top", "trace", "density", "stability", "ntk", "stochastic_edge", and what
:func:`~curvscope.tracking.register_measurement` adds); :mod:`curvscope.tracking.measurements`
says what a measurement is. A user's own goes in without editing curvscope::

    from curvscope.tracking import register_measurement

    @register_measurement("my_norm")
    def my_norm(op, model, optimizer, tracker):
        ...
        return {"my_norm": value}, {}

    Tracker(..., measurements=("top", "my_norm"))

A callable may also be passed directly in ``measurements`` (its ``__name__`` is its name), or a
``(name, callable)`` pair. A measurement that cannot be taken at some snapshot (Adam's
preconditioned sharpness before the optimizer's first step) raises :class:`MeasurementSkipped`
with the reason; the snapshot is then recorded without its scalars, with the reason in its notes
(see "Failures" in :class:`Tracker`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import is_distributed, rank
from ..operators import HessianOperator
from ..operators.batches import default_unpack, first_tensor
from ..operators.functional import default_dtype_for, random_modules
from ..rng import preserved_rng
from .loggers import SnapshotLogger
from .measurements import MEASUREMENTS, Measurement, MeasurementSkipped
from .schedule import Schedule
from .store import RUN_FILE, RunStore, _as_scalar

logger = logging.getLogger("curvscope.tracking")

#: Key of the operator build among the things that have worked once (no measurement name).
_OPERATOR = "<operator>"


# --------------------------------------------------------------------------------------------
# The tracker


class _Current(dict[str, tuple[dict[str, Any], dict[str, Any]]]):
    """``tracker.current``: name -> (scalars, results) of this snapshot's measurements.

    Looking up a measurement that was skipped or failed at this snapshot raises
    :class:`MeasurementSkipped`, so a measurement that needs it is skipped with the reason instead
    of failing with a ``KeyError``.
    """

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
        measurements: Names in :data:`MEASUREMENTS` ("top", "trace", "density", "stability",
            "ntk", "stochastic_edge", or any registered later), callables, or
            ``(name, callable)`` pairs; run in this order.
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
        resume: Continue an existing run folder: steps already committed are skipped. The
            settings must equal the stored ones (``dtype=None`` and the dtype it resolves to
            count as equal), and so must the loss, data, parameters and product dtype (see
            "Resume" below).
        extra: JSON-able user metadata stored in ``run.json`` (must match on resume).
        save_vectors: Store the eigenvectors of "top" (n x k float64 per snapshot).
        operator_options: More keyword arguments of HessianOperator (``keep_graphs``,
            ``allow_tf32``, ``unpack_batch``, ``device``, ``matmat_mode``,
            ``check_determinism``).
        eval_mode: Measure with every module in eval mode (dropout off, BatchNorm on its
            running statistics), for models that train with dropout: their train-mode loss
            is random, so its Hessian is refused. Each module's own mode is restored after
            the snapshot. Default False: the model is measured in the mode it is in.
        loggers: Objects with ``log_snapshot(step, scalars, results)`` and ``close()``
            (:class:`~curvscope.tracking.loggers.SnapshotLogger`), called with every snapshot
            once it is committed (on rank 0 only under torch.distributed), and closed by
            :meth:`close`: :class:`~curvscope.tracking.TensorBoardLogger`,
            :class:`~curvscope.tracking.WandbLogger` or your own. Not part of the run's
            settings: a resumed run may log elsewhere.

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
    - A logger is called after the snapshot is committed, so its failure never costs the run
      folder a snapshot. A logger that raises before it has once succeeded in this Tracker
      raises out of :meth:`step` once the other loggers have had the snapshot (a wrong folder
      or a bug in your own logger shows at the first snapshot); later failures are logged as
      warnings (the first with its traceback) and training goes on.

    A measurement that needs another one (``tracker.current``) is skipped when that one was
    skipped or failed at the snapshot.

    Resume: a series must measure one Hessian, so every snapshot stores in its manifest what
    identifies it (:attr:`identity`, taken at the first snapshot of a session):

    - "loss": the loss function as text: a module's qualified class name with its settings
      (attributes such as ``label_smoothing``; its parameters and buffers by sha256) and
      repr; a function's ``module.qualname``; a ``functools.partial``'s function with its
      arguments.
    - "data": a fingerprint of one pass over ``data`` that does not depend on the order of
      the batches or of the samples (a shuffling DataLoader resumes): the number of samples
      and, per tensor of ``(inputs, targets)`` (after ``operator_options["unpack_batch"]``),
      its shape after the batch dimension, dtype, number of elements, and float64 sums of
      its values, their squares and its values weighted by their position in a sample (a
      one-hot label moved to another class changes it), and the sum over samples of
      (weighted input sum) x (weighted target sum), which sees targets given to other
      inputs. Sums are compared with a relative tolerance of 1e-9, far above the rounding
      of one pass and far below any change of a sample's values.
    - "params": the analysed parameters' names (tensors are found in
      ``model.named_parameters()`` by identity); for ``params=None`` the number of
      trainable tensors and a sha256 of their names.
    - "dtype": the product dtype the operator resolved.

    A resumed Tracker compares the loss, the data (one pass over it) and parameters given by
    name when it is made, and everything at its first snapshot, with the identity of the
    run's latest snapshot; any difference is a ``ValueError`` naming it. Run folders written
    before identities were stored resume without these checks.

    Attributes:
        store: The :class:`RunStore`.
        current: During a snapshot, name -> (scalars, results) of the measurements done so far.
        current_notes: During a snapshot, name -> note of the measurements skipped or failed
            so far.
        last: The last :class:`Snapshot` written in this session (None before).
        identity: What this session measures (loss, data, params, dtype; see "Resume"),
            stored with each of its snapshots; None before its first snapshot.
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
        loggers: Sequence[SnapshotLogger] = (),
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
        self.params = None if params is None else list(params)
        self.dtype = dtype
        self.progress = progress
        self.save_vectors = bool(save_vectors)
        self.operator_options = dict(operator_options or {})
        self.eval_mode = bool(eval_mode)
        self.loggers = _checked_loggers(loggers)
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
            "dtype": _dtype_name(dtype),
            "params": None if self.params is None else [_param_label(p) for p in self.params],
            "save_vectors": self.save_vectors,
            "extra": dict(extra or {}),
        }
        if self.eval_mode:  # only when set, so runs written before the option still resume
            self.config["eval_mode"] = True
        path = _rank_run_dir(run_dir)
        # (stored, given) dtype spellings when one is None and the other explicit: the same
        # settings if None resolves to the explicit dtype, checked at the first snapshot.
        self._dtype_spellings: tuple[str | None, str | None] | None = None
        if resume:
            self._adopt_stored_dtype_spelling(path)
        self.store = RunStore(path, config=self.config, resume=resume)
        for problem in self.store.problems:
            logger.warning("run folder: %s", problem)
        self.current: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.current_notes: dict[str, dict[str, str]] = {}
        self.last: Snapshot | None = None
        self.identity: dict[str, Any] | None = None
        self._loss_identity = _loss_identity(loss_fn)
        self._data_identity: dict[str, Any] | None = None
        self._written: set[int] = set()
        self._succeeded: set[str] = set()  # measurements (and _OPERATOR) that worked once
        self._loggers_ok: set[int] = set()  # indices of loggers that worked once
        self._loggers_warned: set[int] = set()  # ... and of those whose failure was logged
        self._loggers_closed = False
        if self.store.last_identity is not None:
            try:  # fail before any training time is spent, as far as it can be told now
                self._check_identity(self._identity_before_model(self.store.last_identity))
            except BaseException:
                self.store.close()
                raise

    @property
    def run_dir(self) -> Path:
        """The run folder."""
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
            with preserved_rng(), _modes_restored(model, self.eval_mode):
                params = self._params_identity(model) if self.identity is None else None
                op = self._build_operator(step, model, notes)
                if op is not None and self.identity is None:
                    self._take_identity(model, op, params)
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
        path = self.store.write_snapshot(step, row, results, notes=notes, identity=self.identity)
        self._written.add(step)
        written = {name: _plain(value) for name, value in row.items()}
        self.last = Snapshot(step, written, results, path, notes)
        self._report(self.last)
        self._send(self.last)
        return self.last

    def _build_operator(
        self, step: int, model: nn.Module, notes: dict[str, dict[str, str]]
    ) -> HessianOperator | None:
        """The snapshot's Hessian operator, or None when it cannot be built.

        None (every measurement noted as failed) only at a later snapshot (see "Failures" in the
        class docstring).
        """
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

    # -- what the run measures (see "Resume" in the class docstring) ----------------------

    def _adopt_stored_dtype_spelling(self, path: Path) -> None:
        """Take the stored run's dtype spelling when only the None/explicit spelling differs.

        ``dtype=None`` resolves to float64 on the CPU (the model's dtype elsewhere), so a run
        made with None and resumed with ``torch.float64`` (or the reverse) measures the same
        Hessian; the config check of the store compares exactly, so the stored spelling is
        kept, and the resolved dtype is compared at the first snapshot.
        """
        try:
            stored = json.loads((path / RUN_FILE).read_text()).get("config", {})
        except (OSError, ValueError, AttributeError):
            return  # no run yet, or one the store reports with its own error
        if not isinstance(stored, dict) or "dtype" not in stored:
            return
        old, new = stored["dtype"], self.config["dtype"]
        if old != new and (old is None or new is None):
            self.config["dtype"] = old
            self._dtype_spellings = (old, new)

    def _data_fingerprint(self) -> dict[str, Any]:
        """The data's fingerprint; one pass over the data, taken once per Tracker."""
        if self._data_identity is None:
            unpack = self.operator_options.get("unpack_batch") or default_unpack
            with preserved_rng():  # a shuffling DataLoader draws from the global RNG
                self._data_identity = _data_fingerprint(self.data, unpack)
        return self._data_identity

    def _identity_before_model(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """What can be compared before a model is seen.

        The loss, the data (only when the stored run has a data fingerprint to compare with) and
        parameters given by name.
        """
        identity: dict[str, Any] = {"loss": self._loss_identity}
        if "data" in stored:
            identity["data"] = self._data_fingerprint()
        if self.params is not None and all(isinstance(p, str) for p in self.params):
            identity["params"] = list(self.params)
        return identity

    def _params_identity(self, model: nn.Module) -> list[str] | str:
        """Names of the analysed parameters (tensors found in the model by identity).

        For ``params=None`` the count of trainable tensors and a sha256 of their names.
        """
        named = list(model.named_parameters())
        if self.params is None:
            names = [name for name, p in named if p.requires_grad]
            digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
            return f"all {len(names)} trainable tensors (names sha256 {digest})"
        resolved = []
        for index, item in enumerate(self.params):
            if isinstance(item, torch.Tensor):
                name = next((name for name, p in named if p is item), None)
                if name is None:
                    raise ValueError(
                        f"params[{index}], a tensor of shape {list(item.shape)}, is not a "
                        f"parameter of the model given to Tracker.step ({type(model).__name__}): "
                        "pass that model's own parameter tensors (as in "
                        "model.named_parameters()) or their names"
                    )
                resolved.append(name)
            else:
                resolved.append(_param_label(item))
        return resolved

    def _take_identity(
        self, model: nn.Module, op: HessianOperator, params: list[str] | str | None
    ) -> None:
        """Set :attr:`identity` at the session's first snapshot; on resume, compare it.

        Compared with the stored run's, before anything is measured.
        """
        identity = {
            "loss": self._loss_identity,
            "data": self._data_fingerprint(),
            "params": params if params is not None else self._params_identity(model),
            "dtype": _dtype_name(op.dtype),
        }
        stored = self.store.last_identity
        if self._dtype_spellings is not None and (stored is None or "dtype" not in stored):
            self._check_dtype_spelling(model, op)
        if stored is not None:
            self._check_identity(identity)
        self.identity = identity

    def _check_dtype_spelling(self, model: nn.Module, op: HessianOperator) -> None:
        """A run stored without identities, resumed with the other spelling of its dtype.

        None vs explicit: accepted when None resolves to the explicit dtype here.
        """
        if self._dtype_spellings is None:
            return
        stored, given = self._dtype_spellings
        if self.dtype is None:  # stored explicit, now None: op.dtype is what None resolved to
            resolved, explicit = _dtype_name(op.dtype), stored
        else:  # stored None, now explicit: what None would resolve to on this model
            first = dict(model.named_parameters())[op.function.names[0]]
            resolved, explicit = _dtype_name(default_dtype_for(op.device, first.dtype)), given
        if resolved != explicit:
            advice = "dtype=None" if stored is None else f"dtype=torch.{stored}"
            raise ValueError(
                f"cannot resume {self.store.path}: dtype: stored {stored!r}, now {given!r}, "
                f"but dtype=None resolves to {resolved} here. Resume with the stored "
                f"{advice}, or start a new run folder"
            )

    def _check_identity(self, identity: Mapping[str, Any]) -> None:
        """Refuse to resume when ``identity`` differs from the stored run's latest snapshot.

        Keys absent on either side are not compared.
        """
        stored = self.store.last_identity
        if stored is None:
            return
        differences = _identity_differences(stored, identity)
        if differences:
            raise ValueError(
                f"cannot resume {self.store.path}: what is measured differs from the stored "
                f"run ({'; '.join(differences)}). A series must measure one Hessian: resume "
                "with the same loss_fn, data (the order of batches and samples may change) "
                "and params (and dtype), or start a new run folder"
            )

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

    def _send(self, snapshot: Snapshot) -> None:
        """Hand the committed snapshot to every logger (see "Failures" in the class docstring)."""
        if not self.loggers or (is_distributed() and rank() > 0):
            return
        first_error: Exception | None = None
        for index, sink in enumerate(self.loggers):
            try:
                sink.log_snapshot(snapshot.step, snapshot.scalars, snapshot.results)
            except Exception as error:
                name = type(sink).__name__
                if index not in self._loggers_ok:
                    error.add_note(
                        f"curvscope: logger {name} failed at step {snapshot.step} before it had "
                        f"once succeeded in this Tracker, so the error is raised; the snapshot is "
                        f"committed in {snapshot.path} (later failures are logged as warnings "
                        "and training goes on)"
                    )
                    first_error = first_error or error
                    continue
                first = index not in self._loggers_warned
                self._loggers_warned.add(index)
                logger.warning(
                    "step %d: logger %s failed (the snapshot is in the run folder; training goes "
                    "on): %s",
                    snapshot.step,
                    name,
                    _reason(error),
                    exc_info=error if first else None,
                )
                continue
            self._loggers_ok.add(index)
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """Close the loggers and release the run folder (every snapshot is already committed).

        A logger that fails to close is logged as a warning; the others are still closed.
        """
        try:
            if not self._loggers_closed:
                self._loggers_closed = True
                for sink in self.loggers:
                    close = getattr(sink, "close", None)
                    if close is None:
                        continue
                    try:
                        close()
                    except Exception as error:
                        logger.warning(
                            "logger %s failed to close: %s",
                            type(sink).__name__,
                            _reason(error),
                            exc_info=error,
                        )
        finally:
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
    step: int,
    scalars: Mapping[str, Any],
    notes: Mapping[str, Mapping[str, Any]] | None = None,
    threshold_name: str = "threshold",
) -> str:
    """One progress line of a snapshot, as the Tracker logs it and ``curvscope track`` prints it.

    ``step 120  loss 0.41  acc 0.953  sharpness 1.02 / 2/eta 1 = 1.020  tr(H) 45.1 ± 0.80
    neg mass 0.012 < -0.0031  tr(NTK) 8.5e+04  K 0.024  (2.1 s)``, each part only when its
    scalar is there: ``lambda_max`` is printed when there is no ``sharpness`` (the
    "stability" measurement), the standard error of the trace with two significant digits.
    "neg mass W < -B" is ``density_negative_mass_band``: the share of eigenvalues the SLQ
    quadrature puts below -B, where B (``density_negative_band``) is the quadrature's
    resolution (see :func:`~curvscope.tracking.measurements.measure_density`); the raw share
    below 0 is not printed because a near-null space makes it swing between snapshots.
    Measurements with a note are listed at the end: "[skipped: stability]", "[failed: trace]".

    Args:
        step: The snapshot's training step.
        scalars: The snapshot's scalars (:attr:`Snapshot.scalars`).
        notes: The snapshot's notes (:attr:`Snapshot.notes`).
        threshold_name: How the stability threshold is named, e.g. "2/eta" for GD.
    """
    parts = [f"step {step}"]
    if "loss" in scalars:
        parts.append(f"loss {_fmt(scalars['loss'])}")
    if "accuracy" in scalars:
        parts.append(f"acc {scalars['accuracy']:.3f}")
    if "sharpness" in scalars:
        parts.append(
            f"sharpness {_fmt(scalars['sharpness'])} / {threshold_name} "
            f"{_fmt(scalars['stability_threshold'])} = {scalars['edge_ratio']:.3f}"
        )
    elif "lambda_max" in scalars:
        parts.append(f"lambda_max {_fmt(scalars['lambda_max'])}")
    if "trace" in scalars:
        error = scalars.get("trace_std_error")
        suffix = f" ± {two_digits(error)}" if error is not None else ""
        parts.append(f"tr(H) {_fmt(scalars['trace'])}{suffix}")
    if "density_negative_mass_band" in scalars:
        band = scalars.get("density_negative_band")
        suffix = f" < -{_fmt(band)}" if band is not None else ""
        parts.append(f"neg mass {_fmt(scalars['density_negative_mass_band'])}{suffix}")
    if "ntk_trace" in scalars:
        parts.append(f"tr(NTK) {_fmt(scalars['ntk_trace'])}")
    if "stochastic_K" in scalars:
        parts.append(f"K {_fmt(scalars['stochastic_K'])}")
    if "time_total_s" in scalars:
        parts.append(f"({scalars['time_total_s']:.2f} s)")
    for status in ("skipped", "failed"):
        names = [name for name, note in (notes or {}).items() if note.get("status") == status]
        if names:
            parts.append(f"[{status}: {', '.join(names)}]")
    return "  ".join(parts)


def two_digits(value: float) -> str:
    """Two significant digits, trailing zeros kept (a standard error): 0.2025 -> '0.20'."""
    return f"{value:#.2g}".rstrip(".")


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


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float64`` -> "float64"; None stays None."""
    return None if dtype is None else str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Identity of a run: loss, data, parameters, dtype (see "Resume" in Tracker)

#: Relative tolerance of the data fingerprint's sums. One pass sums each batch in float64
#: (rounding about log2(elements) * 2**-53 of the sum of magnitudes) and adds the batch sums
#: exactly (math.fsum), so another batch order moves a sum by ~1e-15 relative, while changing
#: one value of one sample moves it by far more than 1e-9.
_DATA_RTOL = 1e-9

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _qualified(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{module}.{name}" if name else _qualified(type(obj))


def _stable_repr(value: Any) -> str:
    """``repr`` without memory addresses (which change from one process to the next)."""
    return _ADDRESS.sub("", repr(value))


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"tensor{list(tensor.shape)} {_dtype_name(tensor.dtype)} sha256 {digest}"


def _settings(obj: Any, prefix: str = "") -> list[str]:
    """``name=value`` of an object's public plain attributes (numbers, strings, tuples)."""
    plain = (bool, int, float, str, type(None))
    entries = []
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, plain) or (
            isinstance(value, tuple) and all(isinstance(v, plain) for v in value)
        ):
            entries.append(f"{prefix}{key}={value!r}")
        elif isinstance(value, torch.Tensor):
            entries.append(f"{prefix}{key}={_tensor_digest(value)}")
    return entries


def _loss_identity(loss_fn: Any) -> str:
    """A stable text naming the loss function (the same in every process for the same loss).

    A module: its qualified class name, the plain attributes of it and its submodules
    (``reduction``, ``label_smoothing``, ...), its parameters and buffers by sha256, and its
    repr. A function: ``module.qualname``. A ``functools.partial``: its function's identity
    with the arguments' reprs. Any other callable: its class and plain attributes (or its
    own repr). Memory addresses are left out.
    """
    if isinstance(loss_fn, functools.partial):
        arguments = [_stable_repr(a) for a in loss_fn.args]
        arguments += [f"{k}={_stable_repr(v)}" for k, v in sorted(loss_fn.keywords.items())]
        return f"functools.partial({_loss_identity(loss_fn.func)}, {', '.join(arguments)})"
    if isinstance(loss_fn, nn.Module):
        entries = []
        for prefix, module in loss_fn.named_modules():
            entries += _settings(module, f"{prefix}." if prefix else "")
        tensors = [*loss_fn.named_parameters(), *loss_fn.named_buffers()]
        entries += [f"{name}={_tensor_digest(tensor)}" for name, tensor in tensors]
        text = f"{_qualified(type(loss_fn))}({', '.join(entries)})"
        shown = _stable_repr(loss_fn)
        return text if shown == f"{type(loss_fn).__name__}()" else f"{text} {shown}"
    if inspect.ismethod(loss_fn):
        return f"{_qualified(loss_fn.__func__)} (method of a {_qualified(type(loss_fn.__self__))})"
    if inspect.isroutine(loss_fn) or inspect.isclass(loss_fn):
        return _qualified(loss_fn)
    if type(loss_fn).__repr__ is not object.__repr__:
        return f"{_qualified(type(loss_fn))} {_stable_repr(loss_fn)}"
    entries = _settings(loss_fn) if hasattr(loss_fn, "__dict__") else []
    return f"{_qualified(type(loss_fn))}({', '.join(entries)})"


def _tensor_leaves(obj: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a nested tensor, tuple, list or dict."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensor_leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (tuple, list)):
        for index, value in enumerate(obj):
            yield from _tensor_leaves(value, f"{path}[{index}]")


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    x = tensor.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64
        x = x.cpu()
    return x.to(torch.float64)


_GOLDEN = (math.sqrt(5) - 1) / 2


def _position_weights(size: int, device: torch.device) -> torch.Tensor:
    """Fixed weights 1 + frac(j * golden ratio) in [1, 2), distinct for every position j.

    So a weighted sum changes when values move to other positions.
    """
    positions = torch.arange(size, dtype=torch.float64, device=device)
    return 1 + torch.remainder(positions * _GOLDEN, 1.0)


def _data_fingerprint(data: Iterable[Any], unpack: Callable[[Any], Any]) -> dict[str, Any]:
    """One pass over ``data``: a fingerprint that ignores the order of batches and samples.

    ``{"samples": N, "leaves": {path: {...}}, "pairing": ..., "pairing_abs": ...}``. Per
    tensor of ``(inputs, targets)``: its shape after the batch dimension ("varies" when
    batches differ), dtype, number of elements, and float64 sums of its values ("sum"), their
    squares ("sum_sq") and its values weighted by their position inside a sample
    ("weighted_sum", see :func:`_position_weights`: it sees a one-hot label moved to another
    class). "pairing" is the sum over samples of (position-weighted sum of the sample's
    inputs) x (that of its targets), which sees targets given to other inputs, and
    "pairing_abs" the sum of its terms' magnitudes (its scale).
    """
    samples = 0
    leaves: dict[str, dict[str, Any]] = {}
    partials: dict[str, dict[str, list[float]]] = {}
    pairing: list[float] = []
    pairing_abs: list[float] = []
    for raw in data:
        inputs, targets = unpack(raw)
        reference = first_tensor(targets)
        if reference is None:
            reference = first_tensor(inputs)
        if reference is None:
            continue  # the operator refuses such a batch with its own error
        size = int(reference.shape[0]) if reference.ndim > 0 else 1
        samples += size
        rows: dict[str, torch.Tensor] = {}
        for side, part in (("inputs", inputs), ("targets", targets)):
            for path, tensor in _tensor_leaves(part, side):
                x = _as_float64(tensor)
                per_sample = x.ndim > 0 and x.shape[0] == size
                if per_sample:
                    flat = x.flatten(1) if x.ndim > 1 else x.unsqueeze(1)
                else:
                    flat = x.reshape(1, x.numel())
                weighted = flat @ _position_weights(flat.shape[1], flat.device)
                leaf = leaves.setdefault(
                    path,
                    {"shape": list(tensor.shape[1:]), "dtype": _dtype_name(tensor.dtype)},
                )
                if leaf["shape"] != list(tensor.shape[1:]):
                    leaf["shape"] = "varies"
                if leaf["dtype"] != _dtype_name(tensor.dtype):
                    leaf["dtype"] = "varies"
                leaf["elements"] = leaf.get("elements", 0) + tensor.numel()
                sums = partials.setdefault(path, {"sum": [], "sum_sq": [], "weighted_sum": []})
                sums["sum"].append(float(x.sum()))
                sums["sum_sq"].append(float(x.square().sum()))
                sums["weighted_sum"].append(float(weighted.sum()))
                if per_sample:
                    rows[side] = rows[side] + weighted if side in rows else weighted
        if "inputs" in rows and "targets" in rows:
            products = rows["inputs"] * rows["targets"]
            pairing.append(float(products.sum()))
            pairing_abs.append(float(products.abs().sum()))
    for path, sums in partials.items():
        leaves[path].update({key: math.fsum(values) for key, values in sums.items()})
    fingerprint: dict[str, Any] = {"samples": samples, "leaves": leaves}
    if pairing:
        fingerprint["pairing"] = math.fsum(pairing)
        fingerprint["pairing_abs"] = math.fsum(pairing_abs)
    return fingerprint


def _close(a: Any, b: Any, scale: float) -> bool:
    """Equal floats up to ``_DATA_RTOL * scale`` (NaN equals NaN, an infinity itself)."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return bool(a == b)
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= _DATA_RTOL * scale


def _data_differences(stored: Any, now: Any) -> list[str]:
    """What differs between two data fingerprints, one entry per difference."""
    if not isinstance(stored, Mapping) or not isinstance(now, Mapping):
        return [] if stored == now else [f"data: stored {stored!r}, now {now!r}"]
    found = []
    if stored.get("samples") != now.get("samples"):
        found.append(f"data: stored {stored.get('samples')} samples, now {now.get('samples')}")
    old, new = stored.get("leaves", {}), now.get("leaves", {})
    for path in sorted(set(old) | set(new)):
        if path not in new:
            found.append(f"data: stored a tensor at {path}, now none")
            continue
        if path not in old:
            found.append(f"data: no tensor at {path} stored, now one")
            continue
        a, b = old[path], new[path]
        for key in ("shape", "dtype", "elements"):
            if a.get(key) != b.get(key):
                found.append(f"data: {path} {key} stored {a.get(key)!r}, now {b.get(key)!r}")
        squares = max(_magnitude(a.get("sum_sq")), _magnitude(b.get("sum_sq")))
        elements = max(_magnitude(a.get("elements")), _magnitude(b.get("elements")))
        spread = math.sqrt(elements * squares)  # >= the sum of magnitudes
        scales = {"sum": spread, "sum_sq": squares, "weighted_sum": 2 * spread}
        for key, scale in scales.items():
            if not _close(a.get(key), b.get(key), scale):
                found.append(f"data: {path} {key} stored {a.get(key)!r}, now {b.get(key)!r}")
    if "pairing" in stored and "pairing" in now:
        scale = max(_magnitude(stored.get("pairing_abs")), _magnitude(now.get("pairing_abs")))
        if not _close(stored["pairing"], now["pairing"], scale):
            found.append(
                "data: the samples' inputs and targets are paired differently (sum over "
                f"samples of input sum x target sum stored {stored['pairing']!r}, now "
                f"{now['pairing']!r})"
            )
    return found


def _magnitude(value: Any) -> float:
    try:
        value = abs(float(value))
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _identity_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between a stored identity and this session's, over the keys both have."""
    found = []
    for key in sorted(set(stored) & set(now), key=lambda k: (k != "loss", k != "data", k)):
        if key == "data":
            found += _data_differences(stored[key], now[key])
        elif _normalised(stored[key]) != _normalised(now[key]):
            old, new = stored[key], now[key]
            shown = (old, new) if isinstance(old, str) and isinstance(new, str) else None
            old_text, new_text = shown or (repr(old), repr(new))
            found.append(f"{key}: stored {old_text}, now {new_text}")
    return found


def _normalised(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


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


def _checked_loggers(loggers: Sequence[SnapshotLogger]) -> list[SnapshotLogger]:
    """The loggers as a list, each checked to have ``log_snapshot``."""
    if loggers is None:
        return []
    found = [loggers] if hasattr(loggers, "log_snapshot") else list(loggers)
    for index, sink in enumerate(found):
        if not callable(getattr(sink, "log_snapshot", None)):
            raise TypeError(
                f"loggers[{index}] ({type(sink).__name__}) has no log_snapshot method: a logger "
                "has log_snapshot(step, scalars, results) and close() (see "
                "curvscope.tracking.loggers), e.g. TensorBoardLogger('tb/run')"
            )
    return found


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
    """Put every module in eval mode for the block (if ``to_eval``), then restore each one's.

    Each module gets back its own training flag (a model may mix modes, e.g. a frozen BatchNorm).
    """
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
