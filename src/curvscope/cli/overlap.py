"""``curvscope overlap``: how much of the gradient lies in the top-k eigenspace.

As Gur-Ari et al. 2018 measure it; also the curvature along the gradient, and the overlap of top-k
subspaces with saved eigenpairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..linalg import Eigenpairs
from . import jsonout, options, report
from .errors import CLIError, one_line
from .problem import DIGITS, ProblemSpec, load_problem, num_outputs, operator_class


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``overlap`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "overlap",
        parents=[options.problem_parser(DIGITS)],
        formatter_class=options.FORMATTER,
        help="gradient concentration in the top-k eigenspace",
        description=options.wrap(
            "Share of the full-data gradient g in the span of the top-k eigenvectors, "
            "||P_k g||^2 / ||g||^2 (Gur-Ari et al. 2018; a random direction scores k/n), its "
            "share per eigenvector, and the curvature along the gradient g^T H g / ||g||^2. "
            "With --compare, also the overlap (1/k) tr(P_k P_k') of this top-k eigenspace with "
            "saved eigenpairs (another checkpoint's). Writes eigenpairs.npz/.json (with the "
            "vectors, for a later --compare), overlap.npz/.json and overlap.png."
        ),
        epilog="examples:\n"
        "  curvscope overlap                         # k = number of classes\n"
        "  curvscope overlap -k 20 --out results/late\n"
        "  curvscope overlap --model mymodels:early --compare results/late\n"
        + options.COMMON_EPILOG,
    )
    parser.add_argument(
        "-k",
        type=options.positive_int,
        help="eigenspace size (default: the number of classes, the model's output width)",
    )
    options.operator_option(parser, "curvature whose eigenspace is taken (default: hessian)")
    options.eigenpair_options(
        parser,
        which=["largest", "magnitude"],
        which_help="top eigenvalues algebraically or by magnitude (default: largest)",
    )
    parser.add_argument(
        "--compare",
        metavar="EIGENPAIRS",
        help="saved eigenpairs (a file, or the folder of an earlier overlap or top run) to "
        "compare this top-k eigenspace with",
    )
    parser.set_defaults(run=run)


def load_eigenpairs(spec: str) -> tuple[Eigenpairs, Path]:
    """Eigenpairs from a saved file (with or without suffix) or from a results folder."""
    path = Path(spec)
    if path.is_dir():
        path = path / "eigenpairs.npz"
        if not path.exists():
            raise CLIError(
                f"--compare {spec!r}: the folder holds no eigenpairs.npz: pass the folder of a "
                "'curvscope overlap' or 'curvscope top' run, or the eigenpairs file itself"
            )
    try:
        pairs = Eigenpairs.load(path)
    except FileNotFoundError as error:
        raise CLIError(f"--compare {spec!r}: {one_line(error)}") from error
    if pairs.vectors.size == 0:
        raise CLIError(
            f"--compare {spec!r} holds eigenvalues only (saved with --no-vectors): rerun that "
            "command without --no-vectors"
        )
    return pairs, path


def _eigenspace_size(args: argparse.Namespace, op: Any, compare: Any) -> int:
    """-k, or the model's number of outputs, checked against n and the compared vectors."""
    k = args.k
    if k is None:
        k = num_outputs(op)
        if k is None:
            raise CLIError(
                "cannot tell the number of classes (the model's outputs are not (batch, C)): "
                "pass -k"
            )
    if k >= op.num_params:
        raise CLIError(f"-k {k} must be below the number of parameters n = {op.num_params}")
    if compare is not None and compare[0].vectors.shape[0] != op.num_params:
        raise CLIError(
            f"--compare {args.compare!r} holds vectors of length {compare[0].vectors.shape[0]}, "
            f"but this problem has n = {op.num_params} parameters"
        )
    return k


def run(args: argparse.Namespace) -> int:
    """Top-k eigenpairs, the gradient's shares in them, and the subspace overlap."""
    from ..analysis import full_gradient, gradient_overlap, subspace_overlap
    from ..linalg import top_eigenpairs
    from ..plot import plot_overlap

    out = options.out_dir(args)
    started = time.perf_counter()
    compare = load_eigenpairs(args.compare) if args.compare else None
    problem = load_problem(ProblemSpec.from_args(args, DIGITS))
    cls = operator_class(args.operator)
    op = problem.operator(cls)
    k = _eigenspace_size(args, op, compare)
    gradient = full_gradient(op)
    tol = options.tolerance(args, op.dtype)
    with options.progress(args, desc="products", unit="hvp") as bar:
        pairs = top_eigenpairs(
            options.ProgressOperator(op, bar),
            k=k,
            which=args.which,
            tol=tol,
            seed=problem.spec.seed,
        )
    pairs = problem.annotate(pairs, operator=cls.__name__)
    result = gradient_overlap(op, gradient, k=k, eigenpairs=pairs)
    extra: dict[str, Any] = {"num_samples": op.num_samples}
    subspace = None
    if compare is not None:
        other, other_path = compare
        kk = min(k, other.values.size)
        subspace = subspace_overlap(pairs.vectors, other.vectors, k=kk)
        extra.update(
            {
                "compare": str(other_path),
                "subspace_overlap": subspace,
                "subspace_k": kk,
                "subspace_baseline": kk / op.num_params,
            }
        )
    result = problem.annotate(result, **extra)
    files = list(pairs.save(out / "eigenpairs", with_vectors=not args.no_vectors))
    files += result.save(out / "overlap")
    png = out / "overlap.png"
    plot_overlap(result, png)
    files.append(png)

    kinds = {"ggn": "Gauss-Newton G", "fisher": "Fisher", "empirical-fisher": "empirical Fisher"}
    what = kinds.get(args.operator, "Hessian")
    print(f"curvscope overlap: top-{k} eigenspace of the {problem.describe(op, what)}")
    print(f"  gradient ||g|| = {result.gradient_norm:.6g} (full data, mean loss)")
    print(
        f"  overlap  ||P_k g||^2 / ||g||^2 = {result.overlap:.4f}  (a random direction: "
        f"k/n = {result.baseline:.3g})"
    )
    print(f"  curvature along g: g^T A g / ||g||^2 = {result.curvature:.6g}")
    print(f"  {'#':>4}  {'eigenvalue':>14}  {'share':>8}  {'residual':>9}")
    for i, (value, share, residual) in enumerate(
        zip(result.eigenvalues, result.shares, pairs.residuals[:k], strict=True), start=1
    ):
        print(f"  {i:>4}  {value:>14.6g}  {share:>8.4f}  {residual:>9.2e}")
    if subspace is not None:
        print(
            f"  subspace (1/k) tr(P_k P_k') = {subspace:.4f} with {compare[1]} (k = "
            f"{extra['subspace_k']}; random: {extra['subspace_baseline']:.3g})"
        )
    print(f"  products {pairs.meta['num_products']:,} for the eigenpairs (tol {tol:g})")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {report.paths(*files)}")
    jsonout.emit(
        args,
        {
            "problem": jsonout.problem_fields(problem, op),
            "overlap": {
                "k": k,
                "overlap": result.overlap,
                "baseline": result.baseline,
                "curvature": result.curvature,
                "gradient_norm": result.gradient_norm,
                "eigenvalues": result.eigenvalues,
                "shares": result.shares,
                "residuals": pairs.residuals[:k],
                "converged": pairs.converged[:k],
                "which": args.which,
                "tol": tol,
                "num_products": pairs.meta["num_products"],
            },
            "subspace": None
            if subspace is None
            else {
                "compare": str(compare[1]),
                "overlap": subspace,
                "k": extra["subspace_k"],
                "baseline": extra["subspace_baseline"],
            },
            "files": files,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    if not pairs.converged[:k].all():
        print(
            "curvscope: warning: some eigenpairs did not reach the tolerance: the shares of "
            "those are approximate (raise --tol, or use float64)",
            file=sys.stderr,
        )
    return 0
