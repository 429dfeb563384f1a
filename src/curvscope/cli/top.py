"""``curvscope top``: the extreme Hessian eigenpairs by implicitly restarted Lanczos.

Each pair is checked by its residual.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import jsonout, options, report
from .problem import (
    DIGITS,
    OPERATOR_TITLES,
    ProblemSpec,
    load_problem,
    operator_class,
    operator_products,
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``top`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "top",
        parents=[options.problem_parser(DIGITS)],
        formatter_class=options.FORMATTER,
        help="extreme eigenvalues and eigenvectors",
        description=options.wrap(
            "Compute the -k largest (or smallest) Hessian eigenpairs with implicitly "
            "restarted Lanczos (ARPACK) and check each with its relative residual "
            "||Hu - lambda u|| / max|lambda|. Writes eigenpairs.npz/.json (reload with "
            "curvscope.Eigenpairs.load)."
        ),
        epilog="examples:\n"
        "  curvscope top -k 10\n"
        "  curvscope top -k 3 --which smallest --tol 1e-6\n" + options.COMMON_EPILOG,
    )
    parser.add_argument(
        "-k", type=options.positive_int, default=5, help="number of eigenpairs (default: 5)"
    )
    options.eigenpair_options(
        parser,
        which=["largest", "smallest", "magnitude"],
        which_help="algebraically largest or smallest, or largest in magnitude (default: largest)",
    )
    options.operator_option(parser, "matrix analysed (default: hessian; docs/fisher.md)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compute, save and print the eigenpairs; warn when some missed the tolerance."""
    from ..linalg import top_eigenpairs

    out = options.out_dir(args)
    started = time.perf_counter()
    problem = load_problem(ProblemSpec.from_args(args, DIGITS))
    op = problem.operator(operator_class(args.operator))
    tol = options.tolerance(args, op.dtype)
    with options.progress(args, desc="products", unit="hvp") as bar:
        pairs = top_eigenpairs(
            options.ProgressOperator(op, bar),
            k=args.k,
            which=args.which,
            tol=tol,
            seed=problem.spec.seed,
        )
    pairs = problem.annotate(pairs, op)
    files = pairs.save(out / "eigenpairs", with_vectors=not args.no_vectors)
    what = problem.describe(op, OPERATOR_TITLES[args.operator])
    print(f"curvscope top: {args.k} {args.which} eigenvalues of the {what}")
    print(f"  {'#':>3}  {'eigenvalue':>20}  {'residual':>9}  converged (tol {tol:g})")
    for i, (value, residual, ok) in enumerate(
        zip(pairs.values, pairs.residuals, pairs.converged, strict=True), start=1
    ):
        print(f"  {i:>3}  {value:>20.12g}  {residual:>9.2e}  {'yes' if ok else 'NO'}")
    print(f"  products {pairs.meta['num_products']:,} {operator_products(args.operator)}")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {report.paths(*files)}")
    jsonout.emit(
        args,
        {
            "problem": jsonout.problem_fields(problem, op),
            "eigenpairs": {
                **pairs.summary(),
                "which": args.which,
                "tol": tol,
                "num_products": pairs.meta["num_products"],
            },
            "files": files,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    if not pairs.converged.all():
        print(
            "curvscope: warning: some pairs did not reach the tolerance: raise --tol, or use "
            "float64",
            file=sys.stderr,
        )
    return 0
