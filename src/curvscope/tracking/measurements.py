"""Training-dynamics measurements for the tracker (issue 4): stability, NTK trace, and the
stochastic edge of SGD. Registered on import of :mod:`curvscope.tracking`.

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

from typing import Any

from ..analysis.stability import edge_distance, sharpness, stability_threshold
from ..analysis.stochastic_edge import (
    check_one_output,
    noise_kernel_norm,
    stochastic_edge_from_density,
)
from ..operators.ntk import ntk_trace
from ..operators.update import optimizer_config
from .tracker import MeasurementSkipped, register_measurement


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


@register_measurement("stability")
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


@register_measurement("ntk")
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


@register_measurement("stochastic_edge")
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
