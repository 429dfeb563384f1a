"""``curvscope compare``: saved densities drawn in one figure, with a table of their differences.

Two checkpoints, the Hessian against the Gauss-Newton matrix, one layer against another: any
saved :class:`~curvscope.linalg.SpectralDensity`, overlaid on one grid with one kernel width,
and per density its extreme Ritz values, negative mass and Wasserstein-1 distance to the first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..linalg import SpectralDensity
from . import jsonout, options, report
from .errors import CLIError, one_line

#: Where the figure goes without --out.
DEFAULT_OUT = Path("results") / "compare" / "compare.png"


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``compare`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "compare",
        formatter_class=options.FORMATTER,
        help="saved densities in one figure, with their differences",
        description=options.wrap(
            "Draw saved SLQ densities together (density.npz/.json of curvscope density, "
            "decompose's density_TERM, a blocks/ member, a tracked run's "
            "snapshots/step_N/density.npz, or anything SpectralDensity.save wrote) on one grid "
            "with one kernel width, and print per density n, lambda_min, lambda_max, the "
            "negative mass that the quadrature resolves (mass below -band, spectrum_structure) "
            "and the Wasserstein-1 distance to the "
            "first density (scipy.stats.wasserstein_distance of the weighted Ritz values, in "
            "eigenvalue units), and with three or more, the distance of every pair. No "
            "products: only the saved quadratures are read."
        ),
        epilog="examples:\n"
        "  curvscope compare results/early results/late --labels early,late\n"
        "  curvscope compare results/split/density_hessian results/split/density_ggn "
        "--labels H,G --log\n"
        "  curvscope compare a/density.npz b/density.json --out figures/ab.pdf --json\n",
    )
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULT",
        help="a saved density: x, x.npz or x.json, or a folder holding density.npz/.json",
    )
    parser.add_argument(
        "--labels",
        metavar="A,B,...",
        help="legend labels, comma-separated, one per RESULT (default: the RESULTs as given)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help=f"the figure; its suffix picks the format (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--log",
        action="store_true",
        help="draw the log-scale panel only (default: linear and log panels side by side)",
    )
    parser.add_argument(
        "--sigma",
        type=options.positive_float,
        help="Gaussian kernel width of the figure (default: sqrt(1e-5 * max(1, range)) of all "
        "densities together)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="accepted for symmetry; compare draws no bar"
    )
    jsonout.json_option(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(run=run)


def load_density(spec: str) -> tuple[SpectralDensity, Path]:
    """The density saved at ``spec`` (a file with or without suffix, or its folder)."""
    path = Path(spec)
    if path.is_dir():
        if (path / "density.json").is_file():
            path = path / "density"
        else:
            found = sorted(p.stem for p in path.glob("density*.json"))
            hint = (
                f"it holds {', '.join(found)}: pass one of them, e.g. {path / found[0]}"
                if found
                else "pass a density saved by curvscope density or SpectralDensity.save"
            )
            raise CLIError(f"{spec!r} is a folder without density.npz/.json: {hint}")
    try:
        return SpectralDensity.load(path), path
    except FileNotFoundError as error:
        raise CLIError(f"{spec!r}: {one_line(error)}") from error
    except ValueError as error:
        raise CLIError(f"{spec!r} is not a saved density: {one_line(error)}") from error


def labels_of(args: argparse.Namespace) -> list[str]:
    """--labels split at commas, one per RESULT; else the RESULTs without .npz/.json."""
    if args.labels is None:
        return [
            spec[: -len(Path(spec).suffix)] if Path(spec).suffix in (".npz", ".json") else spec
            for spec in args.results
        ]
    labels = [label.strip() for label in args.labels.split(",")]
    if len(labels) != len(args.results) or not all(labels):
        raise CLIError(
            f"--labels {args.labels!r} gives {len(labels)} label(s) for {len(args.results)} "
            "RESULTs: give one non-empty label per RESULT, separated by commas"
        )
    return labels


def figure_path(args: argparse.Namespace) -> Path:
    """--out (``.png`` added when it has no suffix), checked: not a folder, nor under a file."""
    out = Path(args.out) if args.out else DEFAULT_OUT
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder: give a file name such as {out}/a.png")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    options.check_out(out.parent)
    return out


def wasserstein(a: SpectralDensity, b: SpectralDensity) -> float:
    """Wasserstein-1 distance between two densities' quadrature measures (eigenvalue units)."""
    from scipy.stats import wasserstein_distance

    nodes_a, weights_a = a.flat()
    nodes_b, weights_b = b.flat()
    return float(wasserstein_distance(nodes_a, nodes_b, weights_a, weights_b))


def _resolved_negative_mass(density: SpectralDensity) -> dict[str, float]:
    """``negative_mass_band`` and ``band`` of the density's structure.

    The mass below -band, which, unlike the mass below 0, does not swing with the probes where
    a near-null space puts Ritz values a resolution's width either side of 0 (docs/structure.md).
    """
    from ..analysis import spectrum_structure

    structure = spectrum_structure(density)
    return {"negative_mass_band": structure.negative_mass_band, "band": structure.band}


def run(args: argparse.Namespace) -> int:
    """Load, draw and tabulate the densities."""
    from ..plot import plot_density

    started = time.perf_counter()
    labels = labels_of(args)
    out = figure_path(args)
    loaded = [load_density(spec) for spec in args.results]
    densities = [density for density, _ in loaded]
    count = len(densities)
    pairwise = np.zeros((count, count))
    for i in range(count):
        for j in range(i + 1, count):
            pairwise[i, j] = pairwise[j, i] = wasserstein(densities[i], densities[j])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_density(
            densities,
            out,
            labels=labels,
            sigma=args.sigma,
            panels="log" if args.log else "both",
            num_points=4000,
        )
    except (OSError, ValueError) as error:
        raise CLIError(f"--out {str(out)!r}: cannot write the figure: {one_line(error)}") from error

    summaries = [{**density.summary(), **_resolved_negative_mass(density)} for density in densities]
    print(f"curvscope compare: {count} densities (quadratures as saved; no products)")
    head = ("label", "n", "probes x steps", "lambda_min", "lambda_max", "neg. mass")
    head += (f"W1 to {labels[0]}",)
    rows = [
        (
            label,
            f"{s['n']:,}",
            f"{s['num_probes']} x {s['num_steps']}",
            f"{s['lambda_min']:.6g}",
            f"{s['lambda_max']:.6g}",
            f"{s['negative_mass_band']:.4f}",
            f"{pairwise[0, i]:.4g}",
        )
        for i, (label, s) in enumerate(zip(labels, summaries, strict=True))
    ]
    print(report.table(head, rows))
    print("  neg. mass: the mass below -band that the quadrature resolves (spectrum_structure)")
    if count > 2:
        print("  Wasserstein-1 distances of every pair (eigenvalue units):")
        matrix = [(label, *(f"{d:.4g}" for d in pairwise[i])) for i, label in enumerate(labels)]
        print(report.table(("", *labels), matrix, indent="    "))
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {out}")
    entries: list[dict[str, Any]] = [
        {"label": label, "path": str(path), **summary}
        for label, (_, path), summary in zip(labels, loaded, summaries, strict=True)
    ]
    jsonout.emit(
        args,
        {
            "densities": entries,
            "wasserstein_to_first": pairwise[0],
            "wasserstein": pairwise,
            "files": [out],
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
