"""The reproduction protocol: command-line options and the machine-readable summary every
experiment writes, read by experiments/reproduce.py (``make reproduce``) to render
docs/reproductions.md.

Protocol. An experiment is a script ``experiments/NAME.py`` (names starting with ``_`` are
helpers, not experiments) that accepts

    --seeds N      independent runs (seeds 0..N-1) for every headline number (full mode: >= 5)
    --quick        tiny settings that run end to end in well under a minute (CI); the numbers
                   are not meant to reproduce anything
    --threads T    torch and BLAS threads (reproduce.py passes 1)
    --out DIR      folder of the figures (default docs/figures)
    --summary PATH where to write the summary (default results/reproduce/NAME.json)

and writes one JSON summary (:func:`write_summary`), format ``curvscope-reproduction/1``:

    {
      "format": "curvscope-reproduction/1",
      "experiment": "edge_of_stability",          # the script's stem
      "title": "Edge of stability",               # section heading
      "command": ".venv/bin/python experiments/edge_of_stability.py --seeds 5",
      "quick": false,
      "seeds": [0, 1, 2, 3, 4],
      "threads": 1,
      "wall_s": 61.2,                             # the whole script
      "setup": "markdown: what was run (model, data, optimizer, steps, measurements)",
      "figures": ["docs/figures/edge_of_stability.png"],  # relative to the repository root
      "claims": [                                 # one table row each
        {
          "key": "hover",                         # unique within the experiment
          "paper": "Cohen et al. 2021",
          "claim": "the claim, one sentence",
          "paper_value": "the paper's number, as text",
          "metric": "what our headline number is",
          "values": [1.01, 0.99, ...],            # the headline number, one per run
          "labels": ["seed 0, eta 1.5", ...],     # what each value is (same length)
          "rule": "reproduces if ...; partly if ...; otherwise does not",
          "verdict": "reproduces" | "partly" | "does not",
          "figure": "docs/figures/edge_of_stability.png",
          "details": "markdown: per-seed numbers beyond the headline",
          "tried": "markdown: what was tried when it does not (fully) reproduce"
        }
      ]
    }

The verdict is computed in the script by a stated rule with thresholds (:func:`judge` for the
common case of a band on the median), never written by hand. Values may be NaN (a run that
diverged or did not reach the point measured); the rule then says how NaN counts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "reproduce"
FORMAT = "curvscope-reproduction/1"
VERDICTS = ("reproduces", "partly", "does not")


def add_arguments(parser: argparse.ArgumentParser, default_seeds: int = 5) -> None:
    """``--seeds``, ``--quick`` and ``--summary`` (see the module docstring)."""
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"independent runs per headline number (default {default_seeds}; 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings (CI smoke run; no verdicts)"
    )
    parser.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="write the JSON summary here (default: results/reproduce/NAME.json)",
    )
    parser.set_defaults(default_seeds=default_seeds)


def resolve(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Fill the defaults that depend on other options: seeds, summary path, start time."""
    if args.seeds is None:
        args.seeds = 1 if args.quick else args.default_seeds
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    if args.summary is None:
        args.summary = RESULTS / f"{name}.json"
    if not hasattr(args, "started"):
        args.started = time.perf_counter()
    return args


def command(name: str, args: argparse.Namespace) -> str:
    """The command line that reproduces this summary (threads left at their default, 1)."""
    text = f".venv/bin/python experiments/{name}.py --seeds {args.seeds}"
    return text + (" --quick" if args.quick else "")


@dataclass
class Claim:
    """One row of the reproduction table; see the module docstring for the fields."""

    key: str
    paper: str
    claim: str
    paper_value: str
    metric: str
    values: list[float]
    labels: list[str]
    rule: str
    verdict: str
    figure: str | None = None
    details: str = ""
    tried: str = ""

    def __post_init__(self) -> None:
        self.values = [float(v) for v in self.values]
        if len(self.labels) != len(self.values):
            raise ValueError(f"{self.key}: {len(self.values)} values, {len(self.labels)} labels")
        if self.verdict not in VERDICTS:
            raise ValueError(f"{self.key}: verdict {self.verdict!r} not in {VERDICTS}")


@dataclass
class Band:
    """Closed interval [lo, hi]; None is unbounded."""

    lo: float | None = None
    hi: float | None = None

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value) and not math.isinf(value):
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def text(self) -> str:
        if self.lo is None:
            return f"<= {self.hi:g}"
        if self.hi is None:
            return f">= {self.lo:g}"
        return f"in [{self.lo:g}, {self.hi:g}]"


@dataclass
class Verdict:
    verdict: str
    rule: str
    extra: dict = field(default_factory=dict)


def judge(values: Sequence[float], reproduces: Band, partly: Band, share: float = 0.8) -> Verdict:
    """Reproduces when the median is in ``reproduces`` and at least ``share`` of the runs are;
    partly when the median is in ``partly``; otherwise does not. A NaN value (a run that
    diverged or never reached the point measured) counts as outside every band; the median
    is taken over the other runs, and is NaN (does not) when half of them or more are NaN."""
    v = np.asarray(values, dtype=float)
    finite = v[~np.isnan(v)]
    median = float(np.median(finite)) if 2 * finite.size > v.size else float("nan")
    inside = sum(x in reproduces for x in v)
    needed = math.ceil(share * v.size - 1e-9)
    if median in reproduces and inside >= needed:
        verdict = "reproduces"
    elif median in partly:
        verdict = "partly"
    else:
        verdict = "does not"
    rule = (
        f"reproduces if the median is {reproduces.text()} and at least {share:.0%} of the runs "
        f"are; partly if the median is {partly.text()}; otherwise does not"
    )
    if np.isnan(v).any():
        rule += " (n/a: a run that diverged or did not get there, counted as outside)"
    return Verdict(verdict, rule, {"median": median, "inside": inside, "runs": int(v.size)})


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max (NaN-aware: NaN when every value is NaN)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.isnan(v).all():
        return (math.nan, math.nan, math.nan)
    return (float(np.nanmedian(v)), float(np.nanmin(v)), float(np.nanmax(v)))


def num(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; NaN as 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (cells formatted with :func:`num` when they are floats)."""

    def cell(c: object) -> str:
        text = num(c) if isinstance(c, float) else str(c)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def relative(path: Path | str | None) -> str | None:
    """A path relative to the repository root when it lies inside it, else absolute."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def write_summary(
    args: argparse.Namespace,
    name: str,
    title: str,
    setup: str,
    claims: Sequence[Claim],
    figures: Sequence[Path | str],
) -> Path:
    """Write the summary of one experiment (format above); returns its path."""
    keys = [c.key for c in claims]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate claim keys: {keys}")
    payload = {
        "format": FORMAT,
        "experiment": name,
        "title": title,
        "command": command(name, args),
        "quick": bool(args.quick),
        "seeds": list(range(args.seeds)),
        "threads": int(getattr(args, "threads", 1)),
        "wall_s": round(time.perf_counter() - args.started, 1),
        "python": sys.version.split()[0],
        "setup": setup,
        "figures": [relative(f) for f in figures],
        "claims": [{**asdict(c), "figure": relative(c.figure)} for c in claims],
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.summary.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    temporary.replace(args.summary)
    print(f"wrote {args.summary}")
    return args.summary


REQUIRED = {
    "experiment": str,
    "title": str,
    "command": str,
    "quick": bool,
    "seeds": list,
    "wall_s": (int, float),
    "setup": str,
    "figures": list,
    "claims": list,
}
CLAIM_FIELDS = {
    "key": str,
    "paper": str,
    "claim": str,
    "paper_value": str,
    "metric": str,
    "values": list,
    "labels": list,
    "rule": str,
    "verdict": str,
}


def load_summary(path: Path) -> dict:
    """Read and check a summary; raises ValueError naming the file and the field."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON summary ({error})") from error
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not {kind}")
    if not data["claims"]:
        raise ValueError(f"{path}: no claims")
    for i, claim in enumerate(data["claims"]):
        for key, kind in CLAIM_FIELDS.items():
            if not isinstance(claim.get(key), kind):
                raise ValueError(f"{path}: claims[{i}].{key} missing or not {kind}")
        if claim["verdict"] not in VERDICTS:
            raise ValueError(f"{path}: claims[{i}].verdict {claim['verdict']!r}")
        if len(claim["values"]) != len(claim["labels"]):
            raise ValueError(f"{path}: claims[{i}]: values and labels differ in length")
        claim["values"] = [math.nan if v is None else float(v) for v in claim["values"]]
    return data
