"""``curvscope decompose``: densities of H, G, H - G and Papyan's terms of G, side by side.

SLQ densities of the Hessian H, the Gauss-Newton matrix G, the residual H - G and, for cross-entropy
and MSE, Papyan's terms of G (true-label means G0, class means G1, cross-class G2, within-class W),
with each density's structure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..linalg import SpectralDensity
from ..operators.batches import default_unpack
from . import jsonout, options, report
from .errors import PROG, CLIError, one_line
from .explain import describe_tensors, first_batch
from .problem import DIGITS, LoadedProblem, ProblemSpec, load_problem, num_outputs

#: Terms of ``decompose``, in the order of the table and the figure.
TERMS = (
    "hessian",
    "ggn",
    "residual",
    "true_label",
    "class_means",
    "cross_class",
    "within_class",
)
CLASS_LOSSES = ("cross_entropy", "mse")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``decompose`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "decompose",
        parents=[options.problem_parser(DIGITS)],
        formatter_class=options.FORMATTER,
        help="densities of H, G, H - G and G's class terms",
        description=options.wrap(
            "Split the Hessian H into the Gauss-Newton matrix G = J^T H_L J and the residual "
            "H - G (Papyan 2019), and for cross-entropy or MSE split G further into the "
            "class-means, cross-class and within-class terms. Each term's density is estimated "
            "by SLQ and its structure printed: outliers above and below the bulk, bulk edges, "
            "negative mass. Writes density_TERM.npz/.json and structure_TERM.npz/.json per "
            "term, decompose.npz/.json (the table, the exact eigenvalues of the low-rank class "
            "terms) and decompose.png (one log-scale panel per term)."
        ),
        epilog="examples:\n"
        "  curvscope decompose\n"
        "  curvscope decompose --iters 60 --probes 5 --out results/split\n"
        "  curvscope decompose --loss mse --classes mse\n" + options.COMMON_EPILOG,
    )
    options.slq_options(parser, iters=90, probes=10, vectors="random start vectors per density")
    options.structure_options(parser)
    parser.add_argument(
        "--classes",
        choices=["auto", *CLASS_LOSSES, "none"],
        default="auto",
        help="class terms of G for this loss kind; auto: --loss when it is cross_entropy or "
        "mse, none otherwise (default: auto)",
    )
    parser.set_defaults(run=run)


def _class_targets(targets: Any) -> bool:
    """Whether targets name classes: integer labels of shape (B,), or one-hot rows (B, C)."""
    if not isinstance(targets, torch.Tensor):
        return False
    if not targets.is_floating_point():
        return targets.ndim == 1
    if targets.ndim != 2 or targets.shape[1] < 2:
        return False
    binary = bool(((targets == 0) | (targets == 1)).all())
    return binary and bool((targets.sum(dim=1) == 1).all())


def _regression_targets(problem: LoadedProblem) -> str | None:
    """``float32 (B, k)`` when batch 0's targets are not class labels, else None."""
    try:
        batch = first_batch(problem.data)
        _, targets = (problem.unpack or default_unpack)(batch)
    except Exception:
        return None  # the operators report a data problem themselves
    if _class_targets(targets):
        return None
    return describe_tensors(targets)


def _class_kind(args: argparse.Namespace, problem: LoadedProblem) -> str:
    """The loss kind of G's class terms: --classes, or the loss's (none for regression)."""
    kind = args.classes
    if kind == "auto":
        kind = problem.spec.loss if problem.spec.loss in CLASS_LOSSES else "none"
    regression = _regression_targets(problem) if kind != "none" else None
    if regression is None:
        return kind
    what = (
        f"the targets are not class labels (batch 0: {regression}): regression (float) "
        "targets have no classes, so G has no class terms"
    )
    if args.classes != "auto":
        raise CLIError(
            f"--classes {kind}: {what}; pass --classes none for the H, G and H - G split, "
            "or integer class labels (or one-hot targets) for G's class terms"
        )
    print(
        f"{PROG}: note: {what}: splitting H into G and H - G only (--classes none); "
        "integer class labels (or one-hot targets) give G's class terms",
        file=sys.stderr,
    )
    return "none"


def _one_hot_unpack(
    base: Callable[[Any], Any] | None, num_classes: int
) -> Callable[[Any], tuple[Any, Any]]:
    """An unpack hook giving one-hot float targets for integer class targets (MSE classes)."""
    split = base or default_unpack

    def unpack(batch: Any) -> tuple[Any, Any]:
        inputs, targets = split(batch)
        if (
            isinstance(targets, torch.Tensor)
            and not targets.is_floating_point()
            and targets.ndim == 1
        ):
            targets = F.one_hot(targets.long(), num_classes).to(torch.get_default_dtype())
        return inputs, targets

    return unpack


def _operators(problem: LoadedProblem, kind: str) -> tuple[dict[str, Any], Any]:
    """The operators of the terms, by name, and the class decomposition (None for none)."""
    from ..operators import GGNOperator, HessianOperator, ResidualOperator
    from ..operators.class_structure import class_decomposition

    hessian = problem.operator(HessianOperator)
    operators: dict[str, Any] = {"hessian": hessian}
    if kind == "none":
        operators["ggn"] = problem.operator(GGNOperator)
        operators["residual"] = problem.operator(ResidualOperator)
        return operators, None
    classes = num_outputs(hessian)
    if classes is None:
        raise CLIError(
            "--classes needs a model with outputs of shape (batch, C): pass --classes none "
            "for the H, G and H - G split alone"
        )
    unpack = _one_hot_unpack(problem.unpack, classes) if kind == "mse" else problem.unpack
    try:
        decomposition = class_decomposition(
            problem.model,
            problem.loss_fn,
            problem.data,
            loss=kind,  # type: ignore[arg-type]
            **{**problem.options(), "unpack_batch": unpack},
        )
    except ValueError as error:
        raise CLIError(
            f"{one_line(error)} (or pass --classes none for the H, G and H - G split alone)"
        ) from error
    operators["ggn"] = decomposition.ggn
    operators["residual"] = problem.operator(ResidualOperator, unpack_batch=unpack)
    terms = decomposition.terms()
    for name in ("true_label", "class_means", "cross_class", "within_class"):
        operators[name] = terms[name]
    return operators, decomposition


def _density(op: Any, args: argparse.Namespace, seed: int, label: str) -> SpectralDensity:
    from ..linalg import spectral_density

    total = min(args.iters, op.shape[0]) * args.probes
    with options.progress(args, total=total, desc=label, unit="product") as bar:
        return spectral_density(
            options.ProgressOperator(op, bar),
            num_iters=args.iters,
            num_probes=args.probes,
            seed=seed,
        )


def run(args: argparse.Namespace) -> int:
    """Estimate every term's density and structure; save, plot and print them."""
    from ..analysis import spectrum_structure
    from ..plot import TERM_LABELS, plot_densities
    from ..results import save_result

    out = options.out_dir(args)
    started = time.perf_counter()
    problem = load_problem(ProblemSpec.from_args(args, DIGITS))
    kind = _class_kind(args, problem)
    operators, decomposition = _operators(problem, kind)
    hessian = operators["hessian"]
    meta = {**problem.meta(), "class_loss": kind}
    densities: dict[str, SpectralDensity] = {}
    structures: dict[str, Any] = {}
    files: list[Path] = []
    for name, op in operators.items():
        density = _density(op, args, problem.spec.seed, name)
        extra = {**meta, "term": name, "num_samples": hessian.num_samples}
        density = dataclasses.replace(density, meta={**density.meta, **extra})
        structure = spectrum_structure(density, gap_factor=args.gap_factor)
        densities[name], structures[name] = density, structure
        files += density.save(out / f"density_{name}")
        files += structure.save(out / f"structure_{name}")
    arrays: dict[str, np.ndarray] = {}
    exact: dict[str, np.ndarray] = {}
    if decomposition is not None:
        for name in ("true_label", "class_means", "cross_class", "global_means"):
            exact[name] = getattr(decomposition, name).eigenvalues()
        arrays = {f"{name}_eigenvalues": values for name, values in exact.items()}
        arrays["class_counts"] = decomposition.class_counts.cpu().numpy()
    g_max = structures["ggn"].lambda_max
    r = structures["residual"]
    residual_ratio = max(abs(r.lambda_min), abs(r.lambda_max)) / g_max if g_max > 0 else np.nan
    summary = {
        **meta,
        "kind": "Decomposition",
        "terms": {name: s.to_dict() for name, s in structures.items()},
        "residual_over_ggn": residual_ratio,
        "num_iters": args.iters,
        "num_probes": args.probes,
        "seed": problem.spec.seed,
        "gap_factor": args.gap_factor,
        "n": hessian.num_params,
        "num_samples": hessian.num_samples,
        "wall_time_s": time.perf_counter() - started,
        "summary": {
            "densities": {name: d.summary() for name, d in densities.items()},
            "exact_eigenvalues": {name: values.tolist() for name, values in exact.items()},
        },
    }
    files += save_result(out / "decompose", arrays, summary)
    png = out / "decompose.png"
    plot_densities(
        densities,
        png,
        structures,
        labels=TERM_LABELS,
        convention=args.convention,
        title=f"{problem.spec.loss}: n = {hessian.num_params:,}, {args.probes} probes x "
        f"{args.iters} Lanczos steps per term ({args.convention} smoothing)",
    )
    files.append(png)

    print(f"curvscope decompose: {problem.describe(hessian, 'Hessian split')}")
    what = "H, G, H - G" + (
        f" and G's class terms ({kind}, C = {len(exact['class_means'])})" if exact else ""
    )
    print(f"  terms    {what}")
    print(
        f"  SLQ      {args.probes} probes x {args.iters} Lanczos steps per term (float64 "
        "recurrences, full reorthogonalization)"
    )
    rows = [report.structure_row(name, s) for name, s in structures.items()]
    print(report.table(report.STRUCTURE_HEAD, rows))
    for name, structure in structures.items():
        print(report.structure_block(structure, f"{name} ({TERM_LABELS[name]})"))
    if exact:
        print(
            f"  true-label means (G0): exact eigenvalues {report.short_values(exact['true_label'])}"
        )
        print(
            f"  class means: exact eigenvalues (G1, from its C vectors) "
            f"{report.short_values(exact['class_means'])}"
        )
        largest = report.short_values(exact["cross_class"], 10)
        print(f"  cross-class (G2): largest exact eigenvalues {largest}")
        print(
            "  global per-logit means: exact eigenvalues "
            f"{report.short_values(exact['global_means'])}"
        )
    print(
        f"  ||H - G||_2 / ||G||_2 = {residual_ratio:.4g} (extreme Ritz values of H - G over the "
        "largest of G)"
    )
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(
        f"  wrote    {len(files)} files in {out}: density_TERM and structure_TERM (.npz/.json) "
        "per term, decompose.npz/.json, decompose.png"
    )
    terms = {
        name: {"density": densities[name].summary(), "structure": structures[name].to_dict()}
        for name in densities
    }
    jsonout.emit(
        args,
        {
            "problem": jsonout.problem_fields(problem, hessian),
            "class_loss": kind,
            "terms": terms,
            "residual_over_ggn": residual_ratio,
            "exact_eigenvalues": summary["summary"]["exact_eigenvalues"],
            "files": files,
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
