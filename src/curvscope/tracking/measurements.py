"""The measurements a :class:`~curvscope.tracking.Tracker` takes at a snapshot, by name.

:data:`MEASUREMENTS` starts as the table of :func:`builtin_measurements`, built when this module
is defined (nothing elsewhere adds to it on import); :func:`register_measurement` adds a user's
own. A measurement is a callable

    measure(op, model, optimizer, tracker) -> (scalars, results)

``op`` is the snapshot's :class:`~curvscope.operators.HessianOperator`, ``tracker`` gives the
settings (``top_k``, ``density_iters``, ``seed``, ``loss_fn``, ``data``, ``params``, ``dtype``,
...) and, in ``tracker.current``, what the measurements before it in this snapshot returned
(name -> (scalars, results)). ``scalars`` maps names to numbers (columns of the series; names
must not clash), ``results`` maps file stems to objects with ``save(path)`` (or dicts of
arrays), written into the snapshot folder.

The built-ins:

- "top": the top ``tracker.top_k`` Hessian eigenpairs.
- "trace": Hutch++ estimate of tr(H) with its standard error.
- "density": SLQ spectral density, its extreme Ritz values and negative masses.
- "stability": the optimizer's sharpness (lambda_max(H) for SGD/heavy-ball/Nesterov, the
  preconditioned lambda_max(M^1/2 H M^1/2) for Adam/AdamW) against its threshold, read from
  the optimizer's own param_groups and state (:mod:`curvscope.analysis.stability`). Reuses
  "top"'s lambda_max when listed before it (SGD family). Skipped (not failed) for Adam/AdamW
  before the optimizer's first step, when Adam has no second-moment state yet.
- "ntk": Hutchinson estimate of tr(J J^T) over the tracker's data (10 Rademacher probes per
  batch; ``extra={"ntk_method": "exact"}`` for the exact trace on small problems).
- "stochastic_edge": the noise kernel norm K of SGD (Agarwala & Pennington 2024;
  :mod:`curvscope.analysis.stochastic_edge`) for a model with ONE output per sample (others
  are refused with a ValueError at the first snapshot), with its standard error and, by the
  exact method for N <= 2048, ||Q||, the exact mean-square edge of the linearised model. B is
  ``extra["batch_size"]``, eta the optimizer's lr, N the samples of the tracker's data (or
  ``extra["train_samples"]``: the data must be the training set SGD draws from), batches
  B-subsets (``extra["replacement"]: True`` for draws with replacement). Method
  ``extra["stochastic_edge_method"]``: "auto" (default: "exact" when the N x n Jacobian fits
  256 MiB, else "slq"), "exact", "slq" (``stochastic_edge_deflate`` = 8 deflated top
  eigenpairs of the Gauss-Newton matrix, ``stochastic_edge_iters`` = 30 x
  ``stochastic_edge_probes`` = 10 SLQ) or "density" (the snapshot's Hessian density: list
  "density" before it; near interpolation H ~ G).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from ..analysis.stability import edge_distance, sharpness, stability_threshold
from ..analysis.stochastic_edge import (
    check_one_output,
    noise_kernel_norm,
    stochastic_edge_from_density,
)
from ..analysis.structure import spectrum_structure
from ..linalg import spectral_density, top_eigenpairs, trace
from ..operators import HessianOperator
from ..operators.ntk import ntk_trace
from ..operators.update import optimizer_config

#: ``measure(op, model, optimizer, tracker) -> (scalars, results)``; the tracker is a
#: :class:`~curvscope.tracking.Tracker` (typed Any here: this module is imported by it).
Measurement = Callable[
    [HessianOperator, nn.Module, Any, Any], tuple[Mapping[str, Any], Mapping[str, Any]]
]


class MeasurementSkipped(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a measurement that cannot be taken at this snapshot, with the reason.

    Not an error: the Tracker records the snapshot without the measurement's scalars, stores
    ``{"status": "skipped", "reason": str(exception)}`` in the snapshot's notes
    (:attr:`Snapshot.notes`, :attr:`~curvscope.tracking.store.Run.notes`) and logs a warning.
    Example: Adam's preconditioned sharpness before the optimizer's first step, when Adam
    has no second-moment state yet.
    """


def measure_top(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Any) -> Any:
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


def measure_trace(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Any) -> Any:
    """Hutch++ estimate of tr(H) with its standard error."""
    estimate = trace(op, num_probes=tracker.trace_probes, seed=tracker.seed)
    return {"trace": estimate.value, "trace_std_error": estimate.std_error}, {"trace": estimate}


def measure_density(op: HessianOperator, model: nn.Module, optimizer: Any, tracker: Any) -> Any:
    """SLQ spectral density; scalars: its extreme Ritz values and two negative masses.

    - ``density_negative_mass_band``: the quadrature weight (share of eigenvalues) on Ritz
      nodes below ``-density_negative_band``, where the band is the quadrature's resolution,
      Papyan's kernel width in natural units, about 0.37 (lambda_max - lambda_min) / (M - 1)
      for M Lanczos steps: ``negative_mass_band`` and ``band`` of
      :func:`~curvscope.analysis.structure.spectrum_structure`. This is the negative mass the
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


def _need(tracker: Any, name: str, for_what: str) -> Any:
    """What measurement ``name`` returned at this snapshot, for ``for_what`` that needs it."""
    note = tracker.current_notes.get(name)
    if note is not None:
        raise MeasurementSkipped(
            f"it needs {name!r}, which was {note['status']} at this snapshot ({note['reason']})"
        )
    if name not in tracker.current:
        raise ValueError(f"measurement {for_what!r} needs {name!r} listed before it")
    return tracker.current[name]


def measure_stability(op: Any, model: Any, optimizer: Any, tracker: Any) -> Any:
    """Sharpness / threshold of the optimizer driving the model."""
    if optimizer is None:
        raise ValueError("the 'stability' measurement needs tracker.step(..., optimizer=...)")
    named = dict(model.named_parameters())
    config = optimizer_config(optimizer, [named[name] for name in op.param_names])
    if config.method == "adam" and config.v_hat is None:
        raise MeasurementSkipped(
            f"{config.optimizer} has no second-moment state (exp_avg_sq) before its first "
            "optimizer.step(), so its preconditioned sharpness is not defined yet; it is "
            "measured from the first snapshot after a step"
        )
    if config.method != "adam" and "top" in tracker.current:
        value = tracker.current["top"][0]["lambda_max"]
    else:
        value = sharpness(op, config, tol=tracker.top_tol, seed=tracker.seed)
    edge = edge_distance(value, stability_threshold(config))
    return {
        "sharpness": edge.sharpness,
        "stability_threshold": edge.threshold,
        "edge_ratio": edge.ratio,
    }, {}


def measure_ntk(op: Any, model: Any, optimizer: Any, tracker: Any) -> Any:
    """tr(NTK) over the data, and per sample."""
    extra = tracker.config.get("extra", {})
    result = ntk_trace(
        model,
        tracker.data,
        method=extra.get("ntk_method", "hutchinson"),
        num_probes=int(extra.get("ntk_probes", 10)),
        seed=tracker.seed,
        params=op.param_names,
        dtype=op.dtype,
        device=op.device,
        unpack_batch=op.source.unpack_batch,
    )
    return {
        "ntk_trace": result.value,
        "ntk_trace_std_error": result.std_error,
        "ntk_trace_per_sample": result.per_sample,
    }, {}


def measure_stochastic_edge(op: Any, model: Any, optimizer: Any, tracker: Any) -> Any:
    """The noise kernel norm K of SGD (Agarwala & Pennington 2024) with its standard error."""
    extra = tracker.config.get("extra", {})
    batch_size = extra.get("batch_size")
    if optimizer is None or batch_size is None:
        raise ValueError(
            "the 'stochastic_edge' measurement needs the optimizer (for lr) and "
            "Tracker(extra={'batch_size': B}) with the training batch size"
        )
    eta = float(optimizer.param_groups[0]["lr"])
    method = extra.get("stochastic_edge_method", "auto")
    num_samples = extra.get("train_samples")
    replacement = bool(extra.get("replacement", False))
    if method == "density":
        check_one_output(op.function.outputs(op.source.first()))
        _, results = _need(tracker, "density", "stochastic_edge")
        count = int(num_samples or op.num_samples)
        edge = stochastic_edge_from_density(
            results["density"], eta, int(batch_size), count, replacement
        )
    else:
        edge = noise_kernel_norm(
            model,
            op.loss_fn,
            tracker.data,
            eta,
            int(batch_size),
            method=method,
            num_samples=num_samples,
            replacement=replacement,
            num_deflate=int(extra.get("stochastic_edge_deflate", 8)),
            num_iters=int(extra.get("stochastic_edge_iters", 30)),
            num_probes=int(extra.get("stochastic_edge_probes", 10)),
            seed=tracker.seed,
            params=op.param_names,
            dtype=op.dtype,
            device=op.device,
            unpack_batch=op.source.unpack_batch,
        )
    return {
        "stochastic_K": edge.K,
        "stochastic_K_std_error": edge.K_std_error,
        "stochastic_K_trace": edge.K_trace,
        # (1 - gamma) eta lambda_max / 2: K is inf once this reaches 1
        "stochastic_max_diagonal": edge.max_diagonal,
        # ||Q||, the exact mean-square edge of the linearised model (nan unless "exact")
        "stochastic_kernel_norm": edge.kernel_norm,
    }, {}


def builtin_measurements() -> dict[str, Measurement]:
    """The measurements every Tracker knows, by name, in the order the CLI lists them."""
    return {
        "top": measure_top,
        "trace": measure_trace,
        "density": measure_density,
        "stability": measure_stability,
        "ntk": measure_ntk,
        "stochastic_edge": measure_stochastic_edge,
    }


#: Registry of measurements by name: :func:`builtin_measurements`, then what
#: :func:`register_measurement` adds.
MEASUREMENTS: dict[str, Measurement] = builtin_measurements()


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
