"""``curvscope blocks``: one SLQ density per layer (or group of parameters).

The densities of the diagonal curvature blocks, as Zhang et al. 2024 compare them across
architectures.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence

from . import jsonout, options, report
from .errors import CLIError
from .problem import DIGITS, ProblemSpec, load_problem, operator_class


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``blocks`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "blocks",
        parents=[options.problem_parser(DIGITS)],
        formatter_class=options.FORMATTER,
        help="a density per layer (diagonal Hessian blocks)",
        description=options.wrap(
            "Estimate by SLQ the density of every diagonal curvature block: the Hessian of the "
            "loss in one layer's parameters with all others fixed (Zhang et al. 2024 compare "
            "these across architectures). One block per module that owns parameters, or the "
            "groups given with --group. Prints the table and writes blocks/ (a density and a "
            "structure per block, index.json), blocks.txt, blocks.csv and blocks.png."
        ),
        epilog="examples:\n"
        "  curvscope blocks\n"
        "  curvscope blocks --group hidden=0,2 --group head=4 --iters 40\n"
        "  curvscope blocks --model curvscope.zoo:digits_cnn --operator ggn\n"
        + options.COMMON_EPILOG,
    )
    options.slq_options(parser, iters=90, probes=10, vectors="random start vectors per density")
    options.structure_options(parser)
    parser.add_argument(
        "--group",
        action="append",
        metavar="NAME=ITEMS",
        help="a block: NAME=ITEM[,ITEM...], each ITEM a parameter name or a module path "
        "(every parameter under it); repeat for more blocks (default: one per layer)",
    )
    options.operator_option(
        parser,
        "blocks of the Hessian, the Gauss-Newton matrix, the Fisher (one sampled label per "
        "sample, seed 0) or the empirical Fisher (default: hessian)",
    )
    parser.set_defaults(run=run)


def parse_groups(specs: Sequence[str] | None) -> dict[str, list[str]] | None:
    """--group NAME=ITEM,ITEM (or just ITEM, named by itself) -> {name: [items]}."""
    if not specs:
        return None
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, items = spec.partition("=")
        if not sep:
            name, items = spec, spec
        names = [item.strip() for item in items.split(",") if item.strip()]
        if not name.strip() or not names:
            raise CLIError(
                f"--group {spec!r}: write NAME=PARAM_OR_MODULE[,PARAM_OR_MODULE...], e.g. "
                "--group first=0.weight,0.bias"
            )
        if name in groups:
            raise CLIError(f"--group: the name {name!r} is given twice")
        groups[name.strip()] = names
    return groups


def run(args: argparse.Namespace) -> int:
    """Estimate every block's density and structure; save, tabulate, plot and print them."""
    from ..analysis import block_spectra
    from ..plot import plot_densities

    out = options.out_dir(args)
    started = time.perf_counter()
    if args.params:
        raise CLIError(
            "blocks takes parameter subsets as --group NAME=PARAM,PARAM (repeatable), not --params"
        )
    problem = load_problem(ProblemSpec.from_args(args, DIGITS))
    groups = parse_groups(args.group)
    result = block_spectra(
        problem.model,
        problem.loss_fn,
        problem.data,
        groups=groups,
        num_iters=args.iters,
        num_probes=args.probes,
        seed=problem.spec.seed,
        operator_cls=operator_class(args.operator),
        structure_kwargs={"gap_factor": args.gap_factor},
        progress=options.show_progress(args),
        **problem.options(with_params=False),
    )
    result = problem.annotate(result)
    files = [result.save(out / "blocks")]
    table = result.table()
    text = out / "blocks.txt"
    text.write_text(table + "\n")
    rows = result.to_rows()
    table_csv = out / "blocks.csv"
    with table_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = out / "blocks.png"
    plot_densities(
        result.densities,
        png,
        result.structures,
        labels={name: f"{name} (n = {result.structures[name].n:,})" for name in result.names},
        convention=args.convention,
        columns=min(4, len(result)),
        title=f"{args.operator} blocks: {args.probes} probes x {args.iters} Lanczos steps each",
    )
    files += [text, table_csv, png]
    kinds = {"ggn": "Gauss-Newton", "fisher": "Fisher", "empirical-fisher": "empirical Fisher"}
    what = kinds.get(args.operator, "Hessian")
    total = sum(s.n for s in result.structures.values())
    print(
        f"curvscope blocks: {len(result)} diagonal {what} blocks of {problem.spec.loss}, "
        f"{total:,} parameters in all"
    )
    print(
        f"  SLQ      {args.probes} probes x up to {args.iters} Lanczos steps per block (capped "
        "at the block's size)"
    )
    print("\n".join("  " + line for line in table.splitlines()))
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {report.paths(*files)}")
    first = result.densities[result.names[0]]
    blocks = {
        name: {
            "params": list(result.groups[name]),
            "density": result.densities[name].summary(),
            "structure": result.structures[name].to_dict(),
        }
        for name in result.names
    }
    jsonout.emit(
        args,
        {
            "problem": {
                **{key: getattr(problem.spec, key) for key in ("model", "data", "loss", "seed")},
                "params": None,
                "operator": result.meta["operator"],
                "n": total,
                "num_samples": first.meta.get("num_samples"),
                "dtype": first.meta.get("operator_dtype"),
                "device": str(problem.device or next(problem.model.parameters()).device),
            },
            "blocks": blocks,
            "files": files,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
