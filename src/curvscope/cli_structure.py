"""Structure subcommands of ``curvscope``: ``decompose``, ``overlap``, ``blocks``, and
``density --structure``.

* ``decompose``: SLQ densities of the Hessian H, the Gauss-Newton matrix G, the residual H - G
  and, for cross-entropy and MSE, Papyan's class-means, cross-class and within-class terms of G,
  side by side, with each density's structure (outliers, bulk edges, negative mass).
* ``overlap``: gradient concentration in the top-k eigenspace (Gur-Ari et al. 2018), the
  curvature along the gradient, and the overlap of top-k subspaces with saved eigenpairs.
* ``blocks``: one density per layer (or per user group) of the diagonal Hessian blocks.
* ``density --structure``: the structure summary of the density ``density`` just computed.

They follow :mod:`curvscope.cli` (import paths for model, data and loss, one-line errors with
exit status 2, ``--threads``, a results folder with ``.npz``/``.json``/``.png``, a printed
summary) and reuse its helpers. :func:`register` adds them to the ``curvscope`` parser::

    from .cli_structure import register as register_structure
    register_structure(commands, [common])
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import cli
from .cli import CLIError
from .distributed import Shard, is_distributed, is_main_process
from .linalg import Eigenpairs, SpectralDensity
from .plot import TERM_LABELS, plot_densities, plot_overlap

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


# --------------------------------------------------------------------------- structure


def structure_summary(density: SpectralDensity, gap_factor: float = 0.25) -> str:
    """The structure of a density as indented lines for a terminal.

    Runs :func:`~curvscope.analysis.spectrum_structure` (outliers, bulk edges, negative mass)
    on the stored quadrature; no operator products.

    Args:
        density: An SLQ result.
        gap_factor: Separating gap of an outlier, as a multiple of the bulk width.

    Returns:
        A header line and the structure's summary, each line indented by two spaces.
    """
    from .analysis import spectrum_structure

    structure = spectrum_structure(density, gap_factor=gap_factor)
    return _structure_block(structure, f"structure (gap factor {gap_factor:g})")


def _structure_block(structure: Any, header: str) -> str:
    lines = [f"  {header}"]
    lines += [f"    {line}" for line in structure.summary().splitlines()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the problem


@dataclasses.dataclass
class LoadedProblem:
    """Model, data and loss of a structure command, loaded from the import paths."""

    model: nn.Module
    data: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    unpack: Callable[[Any], Any] | None
    device: torch.device | None
    dtype: torch.dtype | None
    params: list[str] | None
    args: argparse.Namespace

    def options(self, with_params: bool = True) -> dict[str, Any]:
        """Keyword arguments shared by every operator of the command."""
        options: dict[str, Any] = {
            "dtype": self.dtype,
            "device": self.device,
            "unpack_batch": self.unpack,
            "keep_graphs": cli.KEEP_GRAPHS[getattr(self.args, "keep_graphs", "auto")],
            "allow_tf32": getattr(self.args, "allow_tf32", False),
        }
        if with_params:
            options["params"] = self.params
        return options

    def operator(self, cls: type, **kwargs: Any) -> Any:
        return cls(self.model, self.loss_fn, self.data, **{**self.options(), **kwargs})

    def meta(self) -> dict[str, Any]:
        args = self.args
        return {
            "model": args.model,
            "data": args.data,
            "loss": args.loss,
            "params": self.params if self.params is not None else "all trainable",
            "command": shlex.join([cli.PROG, *getattr(args, "argv", [])]),
        }

    def describe(self, op: Any, what: str) -> str:
        samples = f"{op.num_samples:,} samples" if op.num_samples else "the data"
        dtype = str(op.dtype).replace("torch.", "")
        subset = "" if self.params is None else f" (params: {', '.join(self.params)})"
        return (
            f"{what} of {self.args.loss} over {samples}, n = {op.num_params:,} parameters"
            f"{subset}, {dtype} on {op.device}"
        )


def load_problem(args: argparse.Namespace, allow_params: bool = True) -> LoadedProblem:
    """Load --model, --data, --loss and --unpack-batch as ``curvscope density`` does.

    Factories run with torch's RNG seeded by --seed (and the caller's RNG state restored).
    """
    if not allow_params and args.params:
        raise CLIError(
            f"{args.command} takes parameter subsets as --group NAME=PARAM,PARAM (repeatable), "
            "not --params"
        )
    device = cli._check_device(args.device)
    loss_fn = cli.load_loss(args.loss)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = cli.load_model(args.model)
        data = cli.load_data(args.data)
    unpack = cli.load_callable(args.unpack_batch, "--unpack-batch") if args.unpack_batch else None
    cli._check_params(model, args.params)
    cli.remember_data(args, data, unpack)
    cli.fit_threads_to_model(args, model)
    if is_distributed() and not cli._sharded_by_sampler(data):
        data = Shard(data)  # every rank walks every world_size-th batch; sums all-reduced
    dtype = cli.DTYPES[args.dtype] if args.dtype else None
    return LoadedProblem(model, data, loss_fn, unpack, device, dtype, args.params, args)


def num_outputs(op: Any) -> int | None:
    """C of a model returning (B, C) outputs on the operator's first batch, else None."""
    with torch.no_grad():
        outputs = op.function.outputs(op.source.first())
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and outputs.shape[1] >= 2:
        return int(outputs.shape[1])
    return None


def _one_hot_unpack(
    base: Callable[[Any], Any] | None, num_classes: int
) -> Callable[[Any], tuple[Any, Any]]:
    """An unpack hook giving one-hot float targets for integer class targets (MSE classes)."""
    from .operators.data import default_unpack

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


# --------------------------------------------------------------------------- helpers


def _density(op: Any, args: argparse.Namespace, label: str) -> SpectralDensity:
    from .linalg import spectral_density

    with tqdm(
        total=min(args.iters, op.shape[0]) * args.probes,
        desc=label,
        unit="product",
        disable=not cli._show_progress(args),
        leave=False,
    ) as bar:
        return spectral_density(
            cli.ProgressOperator(op, bar),
            num_iters=args.iters,
            num_probes=args.probes,
            seed=args.seed,
        )


def _fmt_values(values: Sequence[float] | np.ndarray, limit: int = 12) -> str:
    values = list(values)
    shown = ", ".join(f"{v:.4g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _structure_row(name: str, s: Any) -> tuple[str, ...]:
    return (
        name,
        f"{s.lambda_min:.4g}",
        f"{s.lambda_max:.4g}",
        f"[{s.bulk_min:.3g}, {s.bulk_max:.3g}]",
        f"{s.negative_mass_band:.3f}",
        f"{s.num_outliers}+{s.num_outliers_low}",
    )


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    return "\n".join(
        indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    )


def _class_kind(args: argparse.Namespace) -> str:
    if args.classes != "auto":
        return args.classes
    return args.loss if args.loss in CLASS_LOSSES else "none"


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
    from .operators.data import default_unpack

    try:
        batch = cli._first_batch(problem.data)
        _, targets = (problem.unpack or default_unpack)(batch)
    except Exception:
        return None  # the operators report a data problem themselves
    if _class_targets(targets):
        return None
    return cli._describe_tensors(targets)


# --------------------------------------------------------------------------- commands


def _rank0_writes(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Under torchrun every rank computes the same numbers (products and class sums are
    all-reduced); only rank 0 writes files and prints. The other ranks write into a temporary
    folder, removed afterwards, and print nothing."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        if not is_distributed() or is_main_process():
            return run(args)
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
            return run(argparse.Namespace(**{**vars(args), "out": scratch}))

    return wrapped


@_rank0_writes
def run_decompose(args: argparse.Namespace) -> int:
    """``curvscope decompose``: densities of H, G, H - G and Papyan's class terms of G."""
    from .analysis import spectrum_structure
    from .operators import GGNOperator, HessianOperator, ResidualOperator
    from .operators.class_structure import class_decomposition
    from .results import save_result

    out = cli._out_dir(args)
    started = time.perf_counter()
    problem = load_problem(args)
    kind = _class_kind(args)
    regression = _regression_targets(problem) if kind != "none" else None
    if regression is not None:
        what = (
            f"the targets are not class labels (batch 0: {regression}): regression (float) "
            "targets have no classes, so G has no class terms"
        )
        if args.classes != "auto":
            raise CLIError(
                f"--classes {kind}: {what}; pass --classes none for the H, G and H - G split, "
                "or integer class labels (or one-hot targets) for G's class terms"
            )
        if is_main_process():
            print(
                f"{cli.PROG}: note: {what}: splitting H into G and H - G only (--classes none); "
                "integer class labels (or one-hot targets) give G's class terms",
                file=sys.stderr,
            )
        kind = "none"
    hessian = problem.operator(HessianOperator)
    operators: dict[str, Any] = {"hessian": hessian}
    decomposition = None
    if kind == "none":
        operators["ggn"] = problem.operator(GGNOperator)
        operators["residual"] = problem.operator(ResidualOperator)
    else:
        classes = num_outputs(hessian)
        if classes is None:
            raise CLIError(
                "--classes needs a model with outputs of shape (batch, C): pass --classes none "
                "for the H, G and H - G split alone"
            )
        unpack = problem.unpack
        if kind == "mse":
            unpack = _one_hot_unpack(problem.unpack, classes)
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
                f"{cli._one_line(error)} (or pass --classes none for the H, G and H - G split "
                "alone)"
            ) from error
        operators["ggn"] = decomposition.ggn
        operators["residual"] = problem.operator(ResidualOperator, unpack_batch=unpack)
        terms = decomposition.terms()
        for name in ("true_label", "class_means", "cross_class", "within_class"):
            operators[name] = terms[name]
    meta = {**problem.meta(), "class_loss": kind}
    densities: dict[str, SpectralDensity] = {}
    structures: dict[str, Any] = {}
    files: list[Path] = []
    for name, op in operators.items():
        density = _density(op, args, name)
        density = dataclasses.replace(
            density, meta={**density.meta, **meta, "term": name, "num_samples": hessian.num_samples}
        )
        structure = spectrum_structure(density, gap_factor=args.gap_factor)
        densities[name], structures[name] = density, structure
        files += density.save(out / f"density_{name}")
        files += structure.save(out / f"structure_{name}")
    arrays: dict[str, np.ndarray] = {}
    exact: dict[str, np.ndarray] = {}
    if decomposition is not None:
        exact["true_label"] = decomposition.true_label.eigenvalues()
        exact["class_means"] = decomposition.class_means.eigenvalues()
        exact["cross_class"] = decomposition.cross_class.eigenvalues()
        exact["global_means"] = decomposition.global_means.eigenvalues()
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
        "seed": args.seed,
        "gap_factor": args.gap_factor,
        "n": hessian.num_params,
        "num_samples": hessian.num_samples,
        "wall_time_s": time.perf_counter() - started,
    }
    files += save_result(out / "decompose", arrays, summary)
    png = out / "decompose.png"
    plot_densities(
        densities,
        png,
        structures,
        labels=TERM_LABELS,
        convention=args.convention,
        title=f"{args.loss}: n = {hessian.num_params:,}, {args.probes} probes x "
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
    head = ("term", "lambda_min", "lambda_max", "bulk", "neg. mass", "outliers")
    print(_table(head, [_structure_row(name, s) for name, s in structures.items()]))
    for name, structure in structures.items():
        print(_structure_block(structure, f"{name} ({TERM_LABELS[name]})"))
    if exact:
        print(f"  true-label means (G0): exact eigenvalues {_fmt_values(exact['true_label'])}")
        print(
            f"  class means: exact eigenvalues (G1, from its C vectors) "
            f"{_fmt_values(exact['class_means'])}"
        )
        print(
            f"  cross-class (G2): largest exact eigenvalues {_fmt_values(exact['cross_class'], 10)}"
        )
        print(f"  global per-logit means: exact eigenvalues {_fmt_values(exact['global_means'])}")
    print(
        f"  ||H - G||_2 / ||G||_2 = {residual_ratio:.4g} (extreme Ritz values of H - G over the "
        "largest of G)"
    )
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(
        f"  wrote    {len(files)} files in {out}: density_TERM and structure_TERM (.npz/.json) "
        "per term, decompose.npz/.json, decompose.png"
    )
    return 0


def _load_eigenpairs(spec: str) -> tuple[Eigenpairs, Path]:
    """Eigenpairs from a saved file (with or without suffix) or from a results folder."""
    path = Path(spec)
    if path.is_dir():
        candidates = [path / "eigenpairs.npz"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise CLIError(
                f"--compare {spec!r}: the folder holds no eigenpairs.npz: pass the folder of a "
                "'curvscope overlap' or 'curvscope top' run, or the eigenpairs file itself"
            )
        path = found[0]
    try:
        pairs = Eigenpairs.load(path)
    except FileNotFoundError as error:
        raise CLIError(f"--compare {spec!r}: {cli._one_line(error)}") from error
    if pairs.vectors.size == 0:
        raise CLIError(
            f"--compare {spec!r} holds eigenvalues only (saved with --no-vectors): rerun that "
            "command without --no-vectors"
        )
    return pairs, path


@_rank0_writes
def run_overlap(args: argparse.Namespace) -> int:
    """``curvscope overlap``: gradient concentration in the top-k eigenspace."""
    from .analysis import full_gradient, gradient_overlap, subspace_overlap
    from .linalg import top_eigenpairs
    from .operators import GGNOperator, HessianOperator

    out = cli._out_dir(args)
    started = time.perf_counter()
    compare = _load_eigenpairs(args.compare) if args.compare else None
    problem = load_problem(args)
    cls = {"hessian": HessianOperator, "ggn": GGNOperator}[args.operator]
    op = problem.operator(cls)
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
    gradient = full_gradient(op)
    tol = args.tol if args.tol is not None else cli.DEFAULT_TOL.get(op.dtype, 1e-4)
    with tqdm(
        desc="products", unit="hvp", disable=not cli._show_progress(args), leave=False
    ) as bar:
        pairs = top_eigenpairs(
            cli.ProgressOperator(op, bar), k=k, which=args.which, tol=tol, seed=args.seed
        )
    pairs = dataclasses.replace(
        pairs, meta={**pairs.meta, **problem.meta(), "operator": cls.__name__}
    )
    result = gradient_overlap(op, gradient, k=k, eigenpairs=pairs)
    extra: dict[str, Any] = {**problem.meta(), "num_samples": op.num_samples}
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
    result = dataclasses.replace(result, meta={**result.meta, **extra})
    files = list(pairs.save(out / "eigenpairs", with_vectors=not args.no_vectors))
    files += result.save(out / "overlap")
    png = out / "overlap.png"
    plot_overlap(result, png)
    files.append(png)

    what = "Gauss-Newton G" if args.operator == "ggn" else "Hessian"
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
    print(f"  wrote    {cli._paths(*files)}")
    if not pairs.converged[:k].all():
        print(
            "curvscope: warning: some eigenpairs did not reach the tolerance: the shares of "
            "those are approximate (raise --tol, or use float64)",
            file=sys.stderr,
        )
    return 0


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


@_rank0_writes
def run_blocks(args: argparse.Namespace) -> int:
    """``curvscope blocks``: a density per layer (or group) of the diagonal curvature blocks."""
    from .analysis import block_spectra
    from .operators import GGNOperator, HessianOperator

    out = cli._out_dir(args)
    started = time.perf_counter()
    problem = load_problem(args, allow_params=False)
    cls = {"hessian": HessianOperator, "ggn": GGNOperator}[args.operator]
    groups = parse_groups(args.group)
    result = block_spectra(
        problem.model,
        problem.loss_fn,
        problem.data,
        groups=groups,
        num_iters=args.iters,
        num_probes=args.probes,
        seed=args.seed,
        operator_cls=cls,
        structure_kwargs={"gap_factor": args.gap_factor},
        progress=cli._show_progress(args),
        **problem.options(with_params=False),
    )
    result = dataclasses.replace(result, meta={**result.meta, **problem.meta()})
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
    what = "Gauss-Newton" if args.operator == "ggn" else "Hessian"
    total = sum(s.n for s in result.structures.values())
    print(
        f"curvscope blocks: {len(result)} diagonal {what} blocks of {args.loss}, "
        f"{total:,} parameters in all"
    )
    print(
        f"  SLQ      {args.probes} probes x up to {args.iters} Lanczos steps per block (capped "
        "at the block's size)"
    )
    print("\n".join("  " + line for line in table.splitlines()))
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {cli._paths(*files)}")
    return 0


# --------------------------------------------------------------------------- the parser


def _slq_options(parser: argparse.ArgumentParser, iters: int, probes: int) -> None:
    parser.add_argument(
        "--iters",
        type=cli._positive_int,
        default=iters,
        help=f"Lanczos steps per probe (default: {iters})",
    )
    parser.add_argument(
        "--probes",
        type=cli._positive_int,
        default=probes,
        help=f"random start vectors per density (default: {probes})",
    )
    parser.add_argument(
        "--gap-factor",
        type=cli._positive_float,
        default=0.25,
        help="an outlier's gap to the bulk, as a multiple of the bulk's width (default: 0.25; "
        "see curvscope.analysis.spectrum_structure)",
    )
    parser.add_argument(
        "--convention",
        choices=["ghorbani", "papyan"],
        default="ghorbani",
        help="smoothing of the figure: Ghorbani et al. 2019 (kernel variance 1e-5 x "
        "max(1, range)) or Papyan 2020 (width 2/(M-1)/sqrt(8 ln 3) on [-1, 1]) "
        "(default: ghorbani)",
    )


def extend_density(parser: argparse.ArgumentParser, gap_factor: float = 0.25) -> None:
    """Give ``curvscope density`` a ``--structure`` flag that prints and saves the structure.

    The command's own run function is kept and runs first; with ``--structure`` the density
    it saved (``OUT/density``) is read back, its :func:`structure_summary` printed and the
    structure saved as ``OUT/density.structure.npz/.json``. Does nothing when the parser
    already has ``--structure``.
    """
    try:
        parser.add_argument(
            "--structure",
            action="store_true",
            help="print and save the density's structure: outliers, bulk edges, negative "
            "mass (curvscope.analysis.spectrum_structure)",
        )
    except argparse.ArgumentError:
        return
    original = parser.get_default("run")
    if original is None:
        return

    def run(args: argparse.Namespace) -> int:
        code = original(args)
        if code == 0 and getattr(args, "structure", False):
            from .analysis import spectrum_structure

            path = cli._out_dir(args) / "density"
            density = SpectralDensity.load(path)
            structure = spectrum_structure(density, gap_factor=gap_factor)
            files = structure.save(path.with_name("density.structure"))
            print(_structure_block(structure, f"structure (gap factor {gap_factor:g})"))
            print(f"  wrote    {cli._paths(*files)}")
        return code

    parser.set_defaults(run=run)


def register(
    subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]
) -> None:
    """Add ``decompose``, ``overlap`` and ``blocks`` to the ``curvscope`` subcommands.

    Args:
        subparsers: The ``add_subparsers()`` object of the ``curvscope`` parser.
        parents: Parent parsers holding the common options (--model, --data, --loss,
            --unpack-batch, --params, --dtype, --device, --seed, --threads, --out,
            --no-progress, --debug), as ``curvscope.cli`` builds them.

    A ``density`` subcommand already registered gets ``--structure`` (:func:`extend_density`).
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parents = list(parents)

    decompose = subparsers.add_parser(
        "decompose",
        parents=parents,
        formatter_class=formatter,
        help="densities of H, G, H - G and G's class terms",
        description=cli._wrap(
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
        "  curvscope decompose --loss mse --classes mse\n" + cli.COMMON_EPILOG,
    )
    _slq_options(decompose, iters=90, probes=10)
    decompose.add_argument(
        "--classes",
        choices=["auto", *CLASS_LOSSES, "none"],
        default="auto",
        help="class terms of G for this loss kind; auto: --loss when it is cross_entropy or "
        "mse, none otherwise (default: auto)",
    )
    decompose.set_defaults(run=run_decompose)

    overlap = subparsers.add_parser(
        "overlap",
        parents=parents,
        formatter_class=formatter,
        help="gradient concentration in the top-k eigenspace",
        description=cli._wrap(
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
        "  curvscope overlap --model mymodels:early --compare results/late\n" + cli.COMMON_EPILOG,
    )
    overlap.add_argument(
        "-k",
        type=cli._positive_int,
        help="eigenspace size (default: the number of classes, the model's output width)",
    )
    overlap.add_argument(
        "--operator",
        choices=["hessian", "ggn"],
        default="hessian",
        help="curvature whose eigenspace is taken (default: hessian)",
    )
    overlap.add_argument(
        "--which",
        choices=["largest", "magnitude"],
        default="largest",
        help="top eigenvalues algebraically or by magnitude (default: largest)",
    )
    overlap.add_argument(
        "--tol",
        type=cli._positive_float,
        help="relative residual of the eigenpairs (default: 1e-8 for float64 products, 1e-4 "
        "for float32)",
    )
    overlap.add_argument(
        "--compare",
        metavar="EIGENPAIRS",
        help="saved eigenpairs (a file, or the folder of an earlier overlap or top run) to "
        "compare this top-k eigenspace with",
    )
    overlap.add_argument(
        "--no-vectors", action="store_true", help="save eigenvalues only, not the n x k vectors"
    )
    overlap.set_defaults(run=run_overlap)

    blocks = subparsers.add_parser(
        "blocks",
        parents=parents,
        formatter_class=formatter,
        help="a density per layer (diagonal Hessian blocks)",
        description=cli._wrap(
            "Estimate by SLQ the density of every diagonal curvature block: the Hessian of the "
            "loss in one layer's parameters with all others fixed (Zhang et al. 2024 compare "
            "these across architectures). One block per module that owns parameters, or the "
            "groups given with --group. Prints the table and writes blocks/ (a density and a "
            "structure per block, index.json), blocks.txt, blocks.csv and blocks.png."
        ),
        epilog="examples:\n"
        "  curvscope blocks\n"
        "  curvscope blocks --group hidden=0,2 --group head=4 --iters 40\n"
        "  curvscope blocks --model curvscope.zoo:digits_cnn --operator ggn\n" + cli.COMMON_EPILOG,
    )
    _slq_options(blocks, iters=90, probes=10)
    blocks.add_argument(
        "--group",
        action="append",
        metavar="NAME=ITEMS",
        help="a block: NAME=ITEM[,ITEM...], each ITEM a parameter name or a module path "
        "(every parameter under it); repeat for more blocks (default: one per layer)",
    )
    blocks.add_argument(
        "--operator",
        choices=["hessian", "ggn"],
        default="hessian",
        help="blocks of the Hessian or of the Gauss-Newton matrix (default: hessian)",
    )
    blocks.set_defaults(run=run_blocks)

    density = subparsers.choices.get("density")
    if density is not None:
        extend_density(density)
