"""Run every reproduction and render docs/reproductions.md (``make reproduce``).

Every script ``experiments/NAME.py`` whose name does not start with ``_`` (and is not this
one) is an experiment: it follows the protocol of ``experiments/_reproduce.py`` (``--seeds``,
``--quick``, ``--threads``, ``--out``, ``--summary``) and writes a JSON summary of its claims.
This runner starts them as subprocesses with one thread each, ``--jobs`` at a time (longest
first), keeps each one's output in ``NAME.log`` beside its summary, and renders one table
(a row per claim: paper, claim, the paper's number, ours as median (min-max) over the runs,
verdict, command, figure) and a section per claim.

    .venv/bin/python experiments/reproduce.py            # full: 5 seeds each; writes
        results/reproduce/NAME.json + NAME.log, docs/figures/*.png, docs/reproductions.md
    .venv/bin/python experiments/reproduce.py --quick    # CI smoke run, a few minutes; writes
        everything under results/reproduce_quick/ (docs/ untouched); checks that every
        experiment runs end to end, not its verdicts
    .venv/bin/python experiments/reproduce.py --render   # re-render from the summaries only

Exit status 1 when an experiment failed or wrote no valid summary (the document is still
rendered, with the failure in its table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _reproduce import ROOT, load_summary, markdown_table, num, stats

EXPERIMENTS = Path(__file__).resolve().parent
#: Measured full-mode wall times (s, one thread): the runner starts the longest first.
EXPECTED_S = {
    "class_structure": 900,
    "batchnorm_outliers": 900,
    "gradient_concentration": 500,
    "conservative_sharpening": 400,
    "stochastic_edge": 300,
    "nonnormal_training": 300,
    "edge_of_stability": 200,
    "momentum_nonnormal": 150,
}
VERDICT_MARK = {"reproduces": "reproduces", "partly": "partly", "does not": "**does not**"}


def discover() -> list[str]:
    names = [
        p.stem
        for p in sorted(EXPERIMENTS.glob("*.py"))
        if not p.name.startswith("_") and p.stem != "reproduce"
    ]
    return sorted(names, key=lambda n: -EXPECTED_S.get(n, 600))


def run_one(name: str, args: argparse.Namespace) -> dict:
    summary = args.results / f"{name}.json"
    log = args.results / f"{name}.log"
    summary.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(EXPERIMENTS / f"{name}.py"),
        "--threads",
        "1",
        "--out",
        str(args.figures),
        "--summary",
        str(summary),
    ]
    if args.seeds is not None:
        cmd += ["--seeds", str(args.seeds)]
    if args.quick:
        cmd.append("--quick")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONHASHSEED": "0",
    }
    started = time.perf_counter()
    print(f"[reproduce] start {name}", flush=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - started
    print(f"[reproduce] done  {name}: exit {code}, {wall:.0f} s", flush=True)
    return {"name": name, "code": code, "wall_s": wall, "log": log, "summary": summary}


def collect(names: list[str], args: argparse.Namespace, runs: dict[str, dict]) -> list[dict]:
    """Load each experiment's summary; a missing or invalid one becomes a failure entry."""
    entries = []
    for name in names:
        run = runs.get(name, {"name": name, "code": None, "wall_s": None})
        path = args.results / f"{name}.json"
        try:
            data = load_summary(path)
            error = None
        except ValueError as exc:
            data, error = None, str(exc)
        if run.get("code") not in (0, None) and error is None:
            error = f"exit status {run['code']} (the summary on disk may be stale)"
        entries.append({**run, "data": data, "error": error, "log": args.results / f"{name}.log"})
    return entries


def link(path: str | None, doc: Path) -> str:
    if not path:
        return "-"
    target = Path(path) if Path(path).is_absolute() else ROOT / path
    rel = os.path.relpath(target, doc.parent)
    return f"[{Path(path).name}]({rel})"


def anchor(text: str) -> str:
    """GitHub's heading anchor."""
    keep = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def render(entries: list[dict], args: argparse.Namespace, wall: float | None) -> str:
    doc = args.doc
    quick = args.quick
    lines = ["# Reproductions", ""]
    if quick:
        lines += [
            "> **QUICK MODE.** Rendered by `make reproduce QUICK=1`: tiny settings and one "
            "seed, to check that every reproduction runs end to end. The numbers and verdicts "
            "below are NOT the reproductions' results; `make reproduce` gives those.",
            "",
        ]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if wall is None:
        total = "not re-run (rendered from the summaries)"
    elif args.partial:
        total = f"{wall / 60:.1f} min for {', '.join(args.partial)} (re-run alone)"
        if getattr(args, "full_wall", None):
            total = f"{args.full_wall / 60:.1f} min for all; then {total}"
    else:
        total = f"{wall / 60:.1f} min"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "?"
    lines += [
        "Every claim of the seed papers that curvscope's experiments test, at CPU scale on the "
        "digits, with its verdict. Generated by `experiments/reproduce.py` "
        f"(`make reproduce{' QUICK=1' if quick else ''}`) from the experiments' JSON summaries; "
        "do not edit by hand. Each verdict comes from a rule with stated thresholds, applied "
        "in the experiment's code to the headline number of every run (seeds vary the "
        "initialisation and, where there is one, the batch order). An experiment joins this "
        "page by following the protocol of `experiments/_reproduce.py` (`--seeds`, `--quick`, "
        "`--summary`; one JSON summary per script).",
        "",
        f"Rendered {now}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}, torch {torch_version}, one thread per "
        f"experiment, {args.jobs} at a time; wall time of the whole run: {total}.",
        "",
        "| Paper | Claim | Paper's number | Ours: median (min-max), runs | Verdict | Command "
        "| Figure |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        data = entry["data"]
        if data is None:
            lines.append(
                f"| - | `{entry['name']}` | - | - | **failed**: {entry['error']} "
                f"| `.venv/bin/python experiments/{entry['name']}.py` | - |"
            )
            continue
        for claim in data["claims"]:
            median, lo, hi = stats(claim["values"])
            ours = f"**{num(median)}** ({num(lo)}-{num(hi)}), {len(claim['values'])}: "
            ours += claim["metric"]
            heading = f"{data['title']}: {claim['key']}"
            verdict = VERDICT_MARK[claim["verdict"]]
            if entry["error"]:
                verdict += f" (run failed: {entry['error']})"
            cells = [
                claim["paper"],
                f"{claim['claim']} ([details](#{anchor(heading)}))",
                claim["paper_value"],
                ours,
                verdict,
                f"`{data['command']}`",
                link(claim.get("figure"), doc),
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Wall time per experiment (one thread each):", ""]
    rows = []
    for entry in entries:
        data = entry["data"]
        own = data["wall_s"] if data else None
        rows.append(
            [
                f"`{entry['name']}`",
                "failed" if entry["error"] else "ok",
                num(entry["wall_s"]) if entry.get("wall_s") is not None else "-",
                num(own) if own is not None else "-",
                len(data["seeds"]) if data else "-",
            ]
        )
    lines.append(
        markdown_table(
            ["experiment", "status", "wall s (runner)", "wall s (script)", "seeds"], rows
        )
    )
    for entry in entries:
        data = entry["data"]
        if data is None:
            lines += ["", f"## `{entry['name']}`: failed", "", entry["error"] or "", ""]
            continue
        lines += ["", f"## {data['title']}", "", data["setup"].strip(), ""]
        lines += [
            f"Command: `{data['command']}` ({num(data['wall_s'])} s on one thread; seeds "
            f"{', '.join(map(str, data['seeds']))}).",
        ]
        if data["figures"]:
            images = [f"![{Path(f).stem}]({link_target(f, doc)})" for f in data["figures"]]
            lines += ["", "\n".join(images)]
        for claim in data["claims"]:
            heading = f"{data['title']}: {claim['key']}"
            median, lo, hi = stats(claim["values"])
            lines += [
                "",
                f"### {heading}",
                "",
                f"**Claim** ({claim['paper']}): {claim['claim']} The paper's number: "
                f"{claim['paper_value']}.",
                "",
                f"**Measured**: {claim['metric']}: median **{num(median)}**, range "
                f"{num(lo)}-{num(hi)} over {len(claim['values'])} runs.",
                "",
                "Per run: "
                + "; ".join(
                    f"{label}: {num(value)}"
                    for label, value in zip(claim["labels"], claim["values"], strict=True)
                )
                + ".",
                "",
                f"**Verdict: {claim['verdict']}.** Rule: {claim['rule']}.",
            ]
            if claim.get("details"):
                lines += ["", claim["details"].strip()]
            if claim.get("tried"):
                lines += ["", "**What was tried.** " + claim["tried"].strip()]
    return "\n".join(lines) + "\n"


def link_target(path: str, doc: Path) -> str:
    target = Path(path) if Path(path).is_absolute() else ROOT / path
    return os.path.relpath(target, doc.parent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (tiny settings)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments at a time (default 2)")
    parser.add_argument("--seeds", type=int, help="override every experiment's seed count")
    parser.add_argument(
        "--only", help="run only these (comma-separated); the document still covers all"
    )
    parser.add_argument("--render", action="store_true", help="render from existing summaries")
    parser.add_argument("--results", type=Path, help="summaries and logs (default by mode)")
    parser.add_argument("--figures", type=Path, help="figures (default by mode)")
    parser.add_argument("--doc", type=Path, help="the rendered Markdown (default by mode)")
    parser.add_argument("--timeout", type=float, help="seconds per experiment (default: none)")
    args = parser.parse_args()
    quick_root = ROOT / "results" / "reproduce_quick"
    args.results = args.results or (quick_root if args.quick else ROOT / "results" / "reproduce")
    args.figures = args.figures or (
        args.results / "figures" if args.quick else ROOT / "docs" / "figures"
    )
    args.doc = args.doc or (
        args.results / "reproductions.md" if args.quick else ROOT / "docs" / "reproductions.md"
    )
    for folder in (args.results, args.figures, args.doc.parent):
        folder.mkdir(parents=True, exist_ok=True)
    names = discover()
    selected = names
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown experiments {unknown}; known: {names}")
        selected = [n for n in names if n in wanted]
    runs: dict[str, dict] = {}
    wall = None
    if not args.render:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(lambda n: run_one(n, args), selected):
                runs[result["name"]] = result
        wall = time.perf_counter() - started
    # --only re-runs some; the document always covers every experiment (the others from
    # their summaries on disk), in a fixed order whatever order they ran in.
    args.partial = selected if args.only else None
    record = args.results / "run.json"
    last = json.loads(record.read_text()) if record.exists() else {}
    args.full_wall = last.get("full_wall_s")
    if wall is not None:
        if not args.partial:
            args.full_wall = round(wall, 1)
        record.write_text(
            json.dumps(
                {
                    "wall_s": round(wall, 1),
                    "full_wall_s": args.full_wall,  # the last run of every experiment
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "jobs": args.jobs,
                    "partial": args.partial,
                    "quick": args.quick,
                }
            )
            + "\n"
        )
    elif last:  # --render: the wall time of the last run that wrote the summaries
        wall, args.partial = last.get("wall_s"), last.get("partial")
    entries = collect(sorted(names), args, runs)
    args.doc.write_text(render(entries, args, wall))
    failed = [e["name"] for e in entries if e["error"]]
    claims = sum(len(e["data"]["claims"]) for e in entries if e["data"])
    print(
        f"[reproduce] wrote {args.doc}: {len(entries)} experiments, {claims} claims"
        + (f", {wall:.0f} s" if wall is not None else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
