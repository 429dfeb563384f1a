"""``curvscope trace``: tr(H) by Hutch++ or Hutchinson, with its standard error."""

from __future__ import annotations

import argparse
import time

from . import jsonout, options, report
from .problem import (
    DIGITS,
    OPERATOR_TITLES,
    ProblemSpec,
    load_problem,
    operator_class,
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``trace`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "trace",
        parents=[options.problem_parser(DIGITS)],
        formatter_class=options.FORMATTER,
        help="trace by Hutch++ or Hutchinson, with a standard error",
        description=options.wrap(
            "Estimate tr(H) from --probes Hessian-vector products with Rademacher "
            "probes: Hutch++ (Meyer et al. 2021; a third sketches the top of the spectrum, whose "
            "trace is then exact) or Hutchinson. Prints the value with its standard error and "
            "writes trace.npz/.json (reload with curvscope.TraceEstimate.load)."
        ),
        epilog="examples:\n"
        "  curvscope trace\n"
        "  curvscope trace --probes 300 --method hutchinson\n" + options.COMMON_EPILOG,
    )
    parser.add_argument(
        "--probes",
        type=options.positive_int,
        default=99,
        help="Hessian-vector products in all (default: 99; hutch++ needs at least 6)",
    )
    parser.add_argument(
        "--method",
        choices=["hutch++", "hutchinson"],
        default="hutch++",
        help="estimator (default: hutch++)",
    )
    options.operator_option(parser, "matrix analysed (default: hessian; docs/fisher.md)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Estimate, save and print tr(H) and tr(H)/n."""
    from ..linalg import trace

    out = options.out_dir(args)
    started = time.perf_counter()
    problem = load_problem(ProblemSpec.from_args(args, DIGITS))
    op = problem.operator(operator_class(args.operator))
    products = args.probes if args.method == "hutchinson" else 3 * (args.probes // 3)
    with options.progress(args, total=products, desc="products", unit="hvp") as bar:
        estimate = trace(
            options.ProgressOperator(op, bar),
            num_probes=args.probes,
            method=args.method,
            seed=problem.spec.seed,
        )
    estimate = problem.annotate(estimate, op)
    files = estimate.save(out / "trace")
    print(f"curvscope trace: {problem.describe(op, OPERATOR_TITLES[args.operator])}")
    symbol = {"hessian": "H", "ggn": "G", "fisher": "F", "empirical-fisher": "F_emp"}
    label = f"tr({symbol[args.operator]})"
    print(
        f"  {label:<8} {estimate.value:.6g} ± {report.two_digits(estimate.std_error)} (standard "
        f"error; {args.method}, {estimate.meta['num_products']} products)"
    )
    print(f"  {label + '/n':<8} {estimate.value / op.num_params:.6g} (mean eigenvalue)")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {report.paths(*files)}")
    jsonout.emit(
        args,
        {
            "problem": jsonout.problem_fields(problem, op),
            "trace": {
                "value": estimate.value,
                "std_error": estimate.std_error,
                "per_parameter": estimate.value / op.num_params,
                "method": args.method,
                "num_products": estimate.meta["num_products"],
            },
            "files": files,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
