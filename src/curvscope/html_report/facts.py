"""What a result's metadata says about how it was measured, as (label, value) pairs.

The commands write the same fields into every ``.json`` (:mod:`curvscope.results`,
``Problem.annotate`` of the CLI): the problem (model, data, loss, samples), the operator and
its dtype, the method's settings, the wall time and the versions. Fields a result lacks are
left out; the page shows every field besides, folded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .page import number

#: Metadata field -> label, in the order shown.
FIELDS = (
    ("command", "command"),
    ("model", "model"),
    ("data", "data"),
    ("loss", "loss"),
    ("operator", "operator"),
    ("term", "term"),
    ("params", "parameters analysed"),
    ("n", "n (parameters)"),
    ("num_samples", "samples"),
    ("operator_dtype", "dtype of the products"),
    ("recurrence_dtype", "dtype of the recurrence"),
    ("dtype", "dtype"),
    ("device", "device"),
    ("method", "method"),
    ("which", "which"),
    ("k", "k"),
    ("num_iters", "Lanczos steps per probe"),
    ("num_probes", "probes"),
    ("tol", "tolerance (relative residual)"),
    ("num_products", "operator products"),
    ("seed", "seed"),
)

#: Version fields -> the package they name.
VERSIONS = (
    ("curvscope_version", "curvscope"),
    ("torch_version", "torch"),
    ("numpy_version", "numpy"),
    ("scipy_version", "scipy"),
    ("python_version", "python"),
)


def versions(meta: Mapping[str, Any]) -> str:
    """``curvscope 0.1.0, torch 2.13.0+cpu, ...``: the versions a result was written with."""
    return ", ".join(f"{name} {meta[key]}" for key, name in VERSIONS if key in meta)


def duration(seconds: Any) -> str:
    """``1.21 s``, ``3 min 20 s``, ``2 h 05 min``."""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if not seconds >= 0:
        return number(seconds)
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def facts(meta: Mapping[str, Any], **extra: Any) -> list[tuple[str, str]]:
    """(label, value) pairs of the known fields of ``meta`` (``extra`` fields first win).

    Args:
        meta: A result's metadata (its ``.json``).
        extra: Fields known from elsewhere, such as ``n`` of a loaded density.

    Returns:
        Pairs for :data:`FIELDS` present, then the wall time and the versions.
    """
    merged = {**meta, **{k: v for k, v in extra.items() if v is not None}}
    out = []
    for key, label in FIELDS:
        if key in merged and merged[key] not in (None, ""):
            value = merged[key]
            if key in ("n", "num_samples") and isinstance(value, int):
                text = f"{value:,}"
            elif isinstance(value, float):
                text = number(value, 4)
            else:
                text = str(value)
            out.append((label, text))
    if "wall_time_s" in merged:
        out.append(("wall time", duration(merged["wall_time_s"])))
    if text := versions(merged):
        out.append(("versions", text))
    return out
