"""Sections of a run folder (``curvscope track``, or a Tracker in a user's own loop).

Read with :func:`~curvscope.tracking.load_run`: the run's settings, the evolution figures of
:mod:`curvscope.plot`, a table of the snapshots, and the last snapshot's density and top
eigenvalues.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..plot import plot_density_evolution, plot_sharpness, plot_traces
from ..tracking.store import RUN_FILE, Run, load_run
from .facts import duration, versions
from .page import Section, Table, number
from .results import density_section, draw, eigenpairs_section

#: Scalars shown first in the snapshot table, in this order; the rest follow by name.
FIRST_COLUMNS = (
    "loss",
    "accuracy",
    "lr",
    "lambda_max",
    "sharpness",
    "stability_threshold",
    "edge_ratio",
    "trace",
    "ntk_trace",
    "density_lambda_min",
    "density_lambda_max",
    "density_negative_mass_band",
    "stochastic_K",
)
#: Scalars left out of the table: timings (one total column is kept), constants shown above,
#: and standard errors (shown with their value).
HIDDEN = ("unix_time", "num_params", "time_total_s")
#: Rows of the snapshot table at most; longer runs show evenly spaced snapshots and the last.
MAX_ROWS = 400

#: Training settings of ``curvscope track`` (``config.extra.train``) -> label.
TRAIN_FIELDS = (
    ("model", "model"),
    ("data", "data"),
    ("loss", "loss"),
    ("num_samples", "samples"),
    ("optimizer", "optimizer"),
    ("lr", "learning rate"),
    ("momentum", "momentum"),
    ("batch_size", "batch size"),
    ("seed", "seed"),
)


def read_run(path: Path) -> Run:
    """:func:`~curvscope.tracking.load_run` with a message for a damaged ``run.json``.

    Raises:
        ValueError: ``run.json`` is not a JSON object, or the run has no snapshot.
    """
    run_file = path / RUN_FILE
    try:
        meta = json.loads(run_file.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{run_file}: not valid JSON ({type(error).__name__}: {error}): the run folder is "
            "damaged"
        ) from error
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ValueError(f"{run_file}: must hold a JSON object with a 'config' object")
    run = load_run(path, warn=False)
    if len(run) == 0:
        raise ValueError(f"{path} holds no snapshots yet: nothing to report")
    return run


def run_sections(path: Path, root: Path, dpi: int = 100) -> tuple[list[Section], list[str]]:
    """The sections of a run folder, and its problems as text.

    Args:
        path: The run folder (it has ``run.json``).
        root: The report's folder; sources are named relative to it.
        dpi: Resolution of the figures.

    Returns:
        (sections, problems): the run (settings, evolution figures, snapshot table), then the
        density and the top eigenvalues of the last snapshot that has them.
    """
    run = read_run(path)
    source = _rel(path, root)
    sections = [overview(run, source, dpi)]
    last = _last_with(run, "density")
    if last is not None:
        density = run.load(last, "density")
        sections.append(
            density_section(
                density,
                _rel(run.snapshot_dir(last) / "density.npz", root),
                dpi=dpi,
                title=f"Density at step {last} (last snapshot with one)",
            )
        )
    last = _last_with(run, "top")
    if last is not None:
        pairs = run.load(last, "top")
        sections.append(
            eigenpairs_section(
                pairs,
                _rel(run.snapshot_dir(last) / "top.npz", root),
                title=f"Top eigenvalues at step {last} (last snapshot)",
            )
        )
    for section in sections:
        section.kind = "run"
    return sections, [str(problem) for problem in run.problems]


def _last_with(run: Run, name: str) -> int | None:
    series = run.results(name)
    steps = list(series)
    return int(steps[-1]) if steps else None


def overview(run: Run, source: str, dpi: int = 100) -> Section:
    """The run: settings, wall time, versions, evolution figures, one row per snapshot."""
    scalars = run.scalars
    notes: list[str] = []
    figures = []
    if "lambda_max" in scalars or "sharpness" in scalars:
        figures += draw(
            lambda: plot_sharpness(run),
            "sharpness against the stability threshold, and the loss",
            "Sharpness (solid) against the optimizer's stability threshold (dashed); loss below.",
            dpi,
            notes,
        )
    if len(run.densities):
        figures += draw(
            lambda: plot_density_evolution(run),
            "eigenvalue density over training, heat map",
            "The SLQ density of every snapshot on a log color scale (x: step, y: eigenvalue).",
            dpi,
            notes,
        )
    if any(name in scalars for name in ("trace", "ntk_trace", "stochastic_K")):
        figures += draw(
            lambda: plot_traces(run),
            "traces over training",
            "tr(H) and tr(NTK) with ± 2 standard errors; stochastic-edge K.",
            dpi,
            notes,
        )
    config = run.config
    measured = config.get("measurements")
    steps = run.steps
    summary = (
        f"{len(run)} snapshots from step {int(steps[0])} to step {int(steps[-1])}"
        + (f" ({config['schedule']})" if config.get("schedule") else "")
        + (f": {', '.join(map(str, measured))}." if isinstance(measured, list) else ".")
    )
    return Section(
        "Training run",
        source,
        summary,
        run_facts(run),
        figures,
        [snapshot_table(run)],
        notes,
        dict(run.meta),
    )


def run_facts(run: Run) -> list[tuple[str, str]]:
    """Settings of the run, the size of the model, wall time and versions."""
    config = run.config
    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    train = extra.get("train") if isinstance(extra.get("train"), dict) else {}
    out = []
    for key, label in TRAIN_FIELDS:
        if key in train:
            value = train[key]
            if key == "batch_size" and value is None:
                value = "full batch"
            elif key == "num_samples" and isinstance(value, int):
                value = f"{value:,}"
            out.append((label, str(value)))
    for key, label in (("measurements", "measurements"), ("schedule", "schedule")):
        if config.get(key):
            value = config[key]
            out.append((label, ", ".join(map(str, value)) if isinstance(value, list) else value))
    n = _finite(run.scalars.get("num_params"))
    if n is not None:
        out.append(("n (parameters)", f"{int(n):,}"))
    dtype = config.get("dtype") or _result_meta(run).get("operator_dtype")
    if dtype:
        out.append(("dtype of the products", str(dtype)))
    device = _result_meta(run).get("device")
    if device:
        out.append(("device", str(device)))
    if run.meta.get("created"):
        out.append(("created", str(run.meta["created"])))
    total = run.scalars.get("time_total_s")
    if total is not None and np.isfinite(total).any():
        out.append(("time in measurements", duration(float(np.nansum(total)))))
    end = _finite(run.scalars.get("unix_time"), last=True)
    start = run.meta.get("created_unix")
    if end is not None and isinstance(start, (int, float)) and end >= start:
        out.append(("wall time (creation to last snapshot)", duration(end - start)))
    if text := versions(run.meta):
        out.append(("versions", text))
    return out


def _result_meta(run: Run) -> dict[str, Any]:
    """Metadata of a result of the last snapshot (dtype, device), or {}."""
    for name in ("density", "top", "trace"):
        last = _last_with(run, name)
        if last is not None:
            try:
                return dict(getattr(run.load(last, name), "meta", {}) or {})
            except (KeyError, ValueError):
                continue
    return {}


def _finite(values: np.ndarray | None, last: bool = False) -> float | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    return float(finite[-1] if last else finite[0])


def snapshot_table(run: Run) -> Table:
    """One row per snapshot: the step, the scalars (value ± standard error), notes, time."""
    scalars = run.scalars
    errors = {name[: -len("_std_error")] for name in scalars if name.endswith("_std_error")}
    names = [name for name in FIRST_COLUMNS if name in scalars]
    names += sorted(
        name
        for name in scalars
        if name not in names
        and name not in HIDDEN
        and not name.startswith("time_")
        and not name.endswith("_std_error")
    )
    head = ["step", *(f"{n} ± s.e." if n in errors else n for n in names)]
    timed = "time_total_s" in scalars
    if timed:
        head.append("time (s)")
    noted = bool(run.notes)
    if noted:
        head.append("notes")
    indices = list(range(len(run)))
    note = ""
    if len(indices) > MAX_ROWS:
        keep = np.unique(np.linspace(0, len(run) - 1, MAX_ROWS).round().astype(int))
        indices = [int(i) for i in keep]
        note = f"{len(indices)} of {len(run)} snapshots shown, evenly spaced."
    rows = []
    for i in indices:
        step = int(run.steps[i])
        row = [str(step)]
        for name in names:
            value = number(scalars[name][i], 4)
            if name in errors and math.isfinite(scalars[f"{name}_std_error"][i]):
                value += f" ± {number(scalars[f'{name}_std_error'][i], 2)}"
            row.append(value)
        if timed:
            row.append(number(scalars["time_total_s"][i], 3))
        if noted:
            row.append(_notes(run.notes.get(step, {})))
        rows.append(row)
    numeric = frozenset(range(len(head) - (1 if noted else 0)))
    return Table(head, rows, "Snapshots", numeric=numeric, note=note)


def _notes(notes: dict[str, Any]) -> str:
    parts = []
    for name, note in notes.items():
        if isinstance(note, dict):
            parts.append(f"{name}: {note.get('status', '')} {note.get('reason', '')}".strip())
        else:
            parts.append(f"{name}: {note}")
    return "; ".join(parts)


def _rel(path: Path, root: Path) -> str:
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        return str(path)
    return "" if rel == "." else rel
