"""``curvscope plot``: the figures of a tracked run folder.

Sharpness, density evolution, traces: whichever the run has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import jsonout, options, report
from .errors import PROG, CLIError


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plot`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "plot",
        formatter_class=options.FORMATTER,
        help="figures of a tracked run",
        description=options.wrap(
            "Draw the figures of a run folder (curvscope track, or a Tracker in your own loop): "
            "sharpness.png (sharpness against the stability threshold, and the loss), "
            "density_evolution.png (the SLQ densities over the steps as a heat map on a log "
            "color scale) and traces.png (tr(H), tr(NTK), stochastic-edge K), whichever the "
            "run has."
        ),
        epilog="examples:\n  curvscope plot runs/gd\n  curvscope plot runs/gd --out figures\n",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument("--out", metavar="DIR", help="folder of the PNGs (default: RUN_DIR/plots)")
    parser.add_argument(
        "--threads",
        type=options.positive_int,
        help="torch CPU threads (default: the CPUs this process may use, unless "
        "OMP_NUM_THREADS is set)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="accepted for symmetry; plot draws no bar"
    )
    jsonout.json_option(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Draw and save every figure the run has data for."""
    from ..plot import plot_density_evolution, plot_sharpness, plot_traces
    from ..tracking import load_run

    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise CLIError(
            f"{str(run_dir)!r} is not a run folder (no run.json): pass the folder that "
            "curvscope track or a Tracker wrote"
        )
    out = Path(args.out) if args.out else run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder")
    tracked = load_run(run_dir, warn=False)
    for problem in tracked.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    if len(tracked) == 0:
        raise CLIError(f"{run_dir} holds no snapshots yet: nothing to plot")
    scalars = tracked.scalars
    figures = [
        ("sharpness.png", plot_sharpness, "lambda_max" in scalars or "sharpness" in scalars),
        ("density_evolution.png", plot_density_evolution, len(tracked.densities) > 0),
        (
            "traces.png",
            plot_traces,
            any(name in scalars for name in ("trace", "ntk_trace", "stochastic_K")),
        ),
    ]
    written = []
    for name, draw, available in figures:
        if available:
            out.mkdir(parents=True, exist_ok=True)
            draw(tracked, out / name)
            written.append(out / name)
    if not written:
        raise CLIError(
            f"{run_dir} has no lambda_max, sharpness, density, trace or NTK trace to plot: "
            "track it with --measure top,density,trace (or stability, ntk)"
        )
    print(
        f"curvscope plot: {len(tracked)} snapshots of {run_dir} "
        f"(steps {tracked.steps[0]} to {tracked.steps[-1]})"
    )
    print(f"  wrote    {report.paths(*written)}")
    jsonout.emit(
        args,
        {
            "run_dir": run_dir,
            "num_snapshots": len(tracked),
            "steps": tracked.steps,
            "files": written,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
