"""The ``curvscope`` command: Hessian density, top eigenpairs and trace of a model's loss.

Models, data and losses are given as import paths ``package.module:name`` (as uvicorn and
Lightning take them); the built-in digits problem of :mod:`curvscope.zoo` is the default.
Every failure the user can fix ends in one line ``curvscope: error: ...`` on stderr and exit
status 2 (``--debug`` shows the traceback as well); anything else exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import shlex
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import __version__

PROG = "curvscope"
DEFAULT_MODEL = "curvscope.zoo:trained_digits_mlp"
DEFAULT_DATA = "curvscope.zoo:digits_data"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Default residual tolerance of ``top`` per product dtype (float32 products are noisy at
#: about 1e-7 relative, so 1e-8 is out of their reach).
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------- losses


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries (``F.mse_loss``); integer class targets of shape
    (b,) against outputs of shape (b, C) are one-hot encoded first."""
    if not targets.is_floating_point() and outputs.ndim == targets.ndim + 1:
        targets = F.one_hot(targets, outputs.shape[-1])
    return F.mse_loss(outputs, targets.to(outputs.dtype))


LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": mse_loss,
}


# --------------------------------------------------------------------------- import paths


def load_object(spec: str, option: str) -> Any:
    """Resolve ``package.module:name`` (or ``path/to/file.py:name``) to the object it names.

    ``name`` may be dotted (``module:Class.factory``). The current directory is searched
    first, as uvicorn does, so a ``mymodels.py`` beside you is found as ``mymodels:build``.

    Raises:
        CLIError: With a message that says what is wrong and how to fix it.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(
            f"{option} {spec!r} is not an import path: write package.module:name "
            "(e.g. curvscope.zoo:digits_mlp)"
        )
    if module_name.endswith(".py"):
        module = _load_file(Path(module_name), spec, option)
    else:
        module = _import_module(module_name, spec, option)
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module_name if i == 0 else ".".join([module_name, *attr.split(".")[:i]])
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            own = [n for n in public if getattr(getattr(obj, n), "__module__", None) == owner]
            public = own or public
            hint = f"; it has {', '.join(public[:12])}{', ...' if len(public) > 12 else ''}"
            raise CLIError(f"{option} {spec!r}: {owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def _import_module(module_name: str, spec: str, option: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise CLIError(
                f"{option} {spec!r}: no module named {error.name!r}: install it, or run from "
                "the folder that holds it (or add that folder to PYTHONPATH)"
            ) from error
        raise CLIError(
            f"{option} {spec!r}: importing {module_name} failed: {_one_line(error)}"
        ) from error
    except Exception as error:
        raise CLIError(
            f"{option} {spec!r}: importing {module_name} failed: {_one_line(error)}"
        ) from error


def _load_file(path: Path, spec: str, option: str) -> Any:
    if not path.is_file():
        raise CLIError(f"{option} {spec!r}: there is no file {str(path)!r}")
    name = f"_curvscope_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"{option} {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise CLIError(f"{option} {spec!r}: running {path} failed: {_one_line(error)}") from error
    return module


def _call_factory(obj: Any, spec: str, option: str) -> Any:
    try:
        return obj()
    except Exception as error:
        raise CLIError(f"{option} {spec!r}: calling it failed: {_one_line(error)}") from error


def load_model(spec: str) -> nn.Module:
    """An ``nn.Module`` from an import path naming a module object or a factory."""
    obj = load_object(spec, "--model")
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = _call_factory(obj, spec, "--model")
    if not isinstance(obj, nn.Module):
        raise CLIError(
            f"--model {spec!r} gave a {type(obj).__name__}, not a torch.nn.Module: name a "
            "factory that returns the model (or a module-level model)"
        )
    return obj


def load_data(spec: str) -> Any:
    """A re-iterable of batches from an import path naming the data or a factory of it."""
    obj = load_object(spec, "--data")
    if callable(obj) and not isinstance(obj, (list, tuple, torch.utils.data.DataLoader)):
        obj = _call_factory(obj, spec, "--data")
    if isinstance(obj, nn.Module):
        raise CLIError(
            f"--data {spec!r} gave a torch.nn.Module: name the data (a list or DataLoader of "
            "(inputs, targets) batches) or a factory returning it; the model goes to --model"
        )
    return obj


def load_callable(spec: str, option: str) -> Callable[..., Any]:
    """A function named by an import path, used as it is (not called)."""
    obj = load_object(spec, option)
    if not callable(obj):
        raise CLIError(f"{option} {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def load_loss(spec: str) -> Callable[[Any, Any], torch.Tensor]:
    """A loss ``fn(outputs, targets) -> mean loss`` from a built-in name or import path.

    A class (``torch.nn:CrossEntropyLoss``) is instantiated without arguments.
    """
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" not in spec:
        raise CLIError(
            f"unknown --loss {spec!r}: choose {' or '.join(LOSSES)}, or give an import path "
            "package.module:fn to a function fn(outputs, targets) returning the mean loss"
        )
    obj = load_object(spec, "--loss")
    if isinstance(obj, type):
        obj = _call_factory(obj, spec, "--loss")
    if not callable(obj):
        raise CLIError(f"--loss {spec!r} is a {type(obj).__name__}, not a callable loss")
    return obj


# --------------------------------------------------------------------------- the problem


@dataclasses.dataclass
class Problem:
    """The operator of a command and what to record about how it was built."""

    operator: Any
    model: str
    data: str
    loss: str
    params: list[str] | None
    command: str

    def meta(self) -> dict[str, Any]:
        op = self.operator
        return {
            "model": self.model,
            "data": self.data,
            "loss": self.loss,
            "params": self.params if self.params is not None else "all trainable",
            "num_samples": op.num_samples,
            "device": str(op.device),
            "operator": type(op).__name__,
            "command": self.command,
        }

    def describe(self) -> str:
        op = self.operator
        samples = f"{op.num_samples:,} samples" if op.num_samples else "the data"
        dtype = str(op.dtype).replace("torch.", "")
        subset = "" if self.params is None else f" (params: {', '.join(self.params)})"
        return (
            f"Hessian of {self.loss} over {samples}, n = {op.num_params:,} parameters"
            f"{subset}, {dtype} on {op.device}"
        )


def _check_device(name: str | None) -> torch.device | None:
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CLIError(f"--device {name!r} is not a device: {_one_line(error)}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name!r}: MPS is not available here (use --device cpu)")
    return device


def _check_params(model: nn.Module, params: list[str] | None) -> None:
    if params is None:
        return
    names = [name for name, _ in model.named_parameters()]
    missing = [p for p in params if p not in names]
    if missing:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise CLIError(
            f"--params: the model has no parameter named {', '.join(map(repr, missing))}; "
            f"its parameters are {shown}"
        )


def build_problem(args: argparse.Namespace) -> Problem:
    """Load model, data and loss, and build the Hessian operator (one data pass)."""
    from .operators import HessianOperator

    device = _check_device(args.device)
    loss_fn = load_loss(args.loss)
    # Factories that draw random numbers (initial weights) get the same ones on every run,
    # and the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = load_model(args.model)
        data = load_data(args.data)
    unpack = load_callable(args.unpack_batch, "--unpack-batch") if args.unpack_batch else None
    _check_params(model, args.params)
    operator = HessianOperator(
        model,
        loss_fn,
        data,
        params=args.params,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=device,
        unpack_batch=unpack,
    )
    command = shlex.join([PROG, *args.argv])
    return Problem(operator, args.model, args.data, args.loss, args.params, command)


class ProgressOperator:
    """Pass-through operator that advances a progress bar by the vectors it multiplies."""

    def __init__(self, operator: Any, bar: tqdm) -> None:
        self.operator = operator
        self.bar = bar
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.operator.matmat(V)
        self.bar.update(V.shape[1])
        return out


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("results") / args.command
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _with_meta(result: Any, problem: Problem) -> Any:
    return dataclasses.replace(result, meta={**result.meta, **problem.meta()})


def _paths(*paths: Path) -> str:
    return ", ".join(str(p) for p in paths)


# --------------------------------------------------------------------------- commands


def run_density(args: argparse.Namespace) -> int:
    from .linalg import spectral_density, top_eigenpairs
    from .plot import plot_density

    out = _out_dir(args)
    started = time.perf_counter()
    problem = build_problem(args)
    op = problem.operator
    density = spectral_density(
        op,
        num_iters=args.iters,
        num_probes=args.probes,
        seed=args.seed,
        basis=args.basis,
        progress=_show_progress(args),
    )
    density = _with_meta(density, problem)
    files = list(density.save(out / "density"))
    if args.mark_top:
        pairs = _with_meta(top_eigenpairs(op, k=args.mark_top, seed=args.seed), problem)
        files += pairs.save(out / "top_eigenpairs", with_vectors=False)
        marks, label = pairs.values, f"top {args.mark_top} eigenvalues"
    else:
        marks, label = [density.lambda_max], "largest Ritz value"
    png = out / "density.png"
    plot_density(density, png, top_eigenvalues=marks, top_label=label, sigma=args.sigma)
    files.append(png)
    steps = int(density.num_steps.max())
    print(f"curvscope density: {problem.describe()}")
    print(
        f"  SLQ      {density.num_probes} probes x {steps} Lanczos steps (float64, full "
        f"reorthogonalization), {int(density.num_steps.sum()):,} Hessian-vector products"
    )
    print(
        f"  Ritz     lambda_min = {density.lambda_min:.6g}, lambda_max = {density.lambda_max:.6g}"
    )
    if args.mark_top:
        print(f"  top {args.mark_top}    {_values(pairs.values)}")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {_paths(*files)}")
    return 0


def run_top(args: argparse.Namespace) -> int:
    from .linalg import top_eigenpairs

    out = _out_dir(args)
    started = time.perf_counter()
    problem = build_problem(args)
    op = problem.operator
    tol = args.tol if args.tol is not None else DEFAULT_TOL.get(op.dtype, 1e-4)
    with tqdm(desc="products", unit="hvp", disable=not _show_progress(args), leave=False) as bar:
        pairs = top_eigenpairs(
            ProgressOperator(op, bar), k=args.k, which=args.which, tol=tol, seed=args.seed
        )
    pairs = _with_meta(pairs, problem)
    files = pairs.save(out / "eigenpairs", with_vectors=not args.no_vectors)
    print(f"curvscope top: {args.k} {args.which} eigenvalues of the {problem.describe()}")
    print(f"  {'#':>3}  {'eigenvalue':>20}  {'residual':>9}  converged (tol {tol:g})")
    for i, (value, residual, ok) in enumerate(
        zip(pairs.values, pairs.residuals, pairs.converged, strict=True), start=1
    ):
        print(f"  {i:>3}  {value:>20.12g}  {residual:>9.2e}  {'yes' if ok else 'NO'}")
    print(f"  products {pairs.meta['num_products']:,} Hessian-vector products")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {_paths(*files)}")
    if not pairs.converged.all():
        print(
            "curvscope: warning: some pairs did not reach the tolerance: raise --tol, or use "
            "float64",
            file=sys.stderr,
        )
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from .linalg import trace

    out = _out_dir(args)
    started = time.perf_counter()
    problem = build_problem(args)
    op = problem.operator
    with tqdm(
        total=args.probes if args.method == "hutchinson" else 3 * (args.probes // 3),
        desc="products",
        unit="hvp",
        disable=not _show_progress(args),
        leave=False,
    ) as bar:
        estimate = trace(
            ProgressOperator(op, bar), num_probes=args.probes, method=args.method, seed=args.seed
        )
    estimate = _with_meta(estimate, problem)
    files = estimate.save(out / "trace")
    n = op.num_params
    print(f"curvscope trace: {problem.describe()}")
    print(
        f"  tr(H)    {estimate.value:.6g} ± {_two_digits(estimate.std_error)} (standard error; "
        f"{args.method}, {estimate.meta['num_products']} products)"
    )
    print(f"  tr(H)/n  {estimate.value / n:.6g} (mean eigenvalue)")
    print(f"  time     {time.perf_counter() - started:.1f} s")
    print(f"  wrote    {_paths(*files)}")
    return 0


def _two_digits(value: float) -> str:
    """Two significant digits, trailing zeros kept: 0.2025 -> '0.20'."""
    return f"{value:#.2g}".rstrip(".")


def _values(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one-line :class:`CLIError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


MAIN_EPILOG = """\
examples:
  curvscope density                          # built-in digits MLP: density.png in results/density
  curvscope top -k 5                         # its 5 largest Hessian eigenvalues
  curvscope trace --probes 60                # tr(H) by Hutch++
  curvscope density --model mymodels:build --data mymodels:batches --loss mse

Models, data and losses are import paths package.module:name; a callable is called with no
arguments (a factory). Run 'curvscope COMMAND --help' for each command's options.
"""

COMMON_EPILOG = """
import paths:
  --model mymodels:build    mymodels.py in the current folder (or importable), build() -> nn.Module
  --data  mymodels:batches  batches() -> list or DataLoader of (inputs, targets), walked per product
  --loss  mymodels:loss     loss(outputs, targets) -> the batch's mean loss (a scalar tensor)
"""


def _common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("problem (default: the built-in digits MLP)")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="MODULE:FACTORY",
        help=f"import path of an nn.Module or a factory returning one (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--data",
        default=DEFAULT_DATA,
        metavar="MODULE:FACTORY",
        help="import path of a re-iterable of (inputs, targets) batches (list, DataLoader) or "
        f"a factory returning one (default: {DEFAULT_DATA})",
    )
    group.add_argument(
        "--loss",
        default="cross_entropy",
        metavar="LOSS",
        help="cross_entropy, mse (integer targets one-hot encoded), or an import path "
        "MODULE:FN of fn(outputs, targets) -> mean loss (default: cross_entropy)",
    )
    group.add_argument(
        "--unpack-batch",
        metavar="MODULE:FN",
        help="import path of fn(batch) -> (inputs, targets) for batches that are not pairs "
        "(dicts, say); inputs may be a tensor, a tuple (model(*inputs)) or a dict "
        "(model(**inputs))",
    )
    group.add_argument(
        "--params",
        nargs="+",
        metavar="NAME",
        help="analyse only these parameters (names as in model.named_parameters()); "
        "default: all trainable",
    )
    group = common.add_argument_group("numerics and output")
    group.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="dtype of the Hessian-vector products (default: float64 on CPU, the model's "
        "dtype elsewhere); Lanczos always runs in float64",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the model's device)")
    group.add_argument(
        "--seed", type=int, default=0, help="seed of probes and of the factories (default: 0)"
    )
    group.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)"
    )
    group.add_argument("--out", metavar="DIR", help="results folder (default: results/COMMAND)")
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on a terminal only)"
    )
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``curvscope`` argument parser with its ``density``, ``top`` and ``trace`` commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Hessian spectra of neural-network losses: eigenvalue density (SLQ), top "
        "eigenpairs, trace.",
        epilog=MAIN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()

    density = commands.add_parser(
        "density",
        parents=[common],
        formatter_class=formatter,
        help="eigenvalue density by stochastic Lanczos quadrature",
        description=_wrap(
            "Estimate the Hessian's eigenvalue density by stochastic Lanczos quadrature "
            "(Ghorbani et al. 2019): --probes Gaussian start vectors, --iters Lanczos steps each, "
            "float64 recurrences with full reorthogonalization. Writes density.npz/.json (Ritz "
            "values and weights; reload with curvscope.SpectralDensity.load) and density.png "
            "(linear and log panels)."
        ),
        epilog="examples:\n"
        "  curvscope density\n"
        "  curvscope density --iters 120 --probes 20 --mark-top 5 --out results/run1\n"
        "  curvscope density --model curvscope.zoo:digits_cnn --basis disk\n" + COMMON_EPILOG,
    )
    density.add_argument(
        "--iters", type=_positive_int, default=90, help="Lanczos steps per probe (default: 90)"
    )
    density.add_argument(
        "--probes", type=_positive_int, default=10, help="random start vectors (default: 10)"
    )
    density.add_argument(
        "--basis",
        choices=["memory", "disk"],
        default="memory",
        help="keep the Lanczos basis in RAM or in a temporary memmap file (default: memory)",
    )
    density.add_argument(
        "--mark-top",
        type=_nonnegative_int,
        default=0,
        metavar="K",
        help="compute the K largest eigenvalues (extra products) and mark them on the plot; "
        "default: mark the largest Ritz value, which costs nothing",
    )
    density.add_argument(
        "--sigma",
        type=_positive_float,
        help="Gaussian kernel width of the plot (default: sqrt(1e-5 * max(1, spectral range)))",
    )
    density.set_defaults(run=run_density)

    top = commands.add_parser(
        "top",
        parents=[common],
        formatter_class=formatter,
        help="extreme eigenvalues and eigenvectors",
        description=_wrap(
            "Compute the -k largest (or smallest) Hessian eigenpairs with implicitly "
            "restarted Lanczos (ARPACK) and check each with its relative residual "
            "||Hu - lambda u|| / max|lambda|. Writes eigenpairs.npz/.json (reload with "
            "curvscope.Eigenpairs.load)."
        ),
        epilog="examples:\n"
        "  curvscope top -k 10\n"
        "  curvscope top -k 3 --which smallest --tol 1e-6\n" + COMMON_EPILOG,
    )
    top.add_argument("-k", type=_positive_int, default=5, help="number of eigenpairs (default: 5)")
    top.add_argument(
        "--which",
        choices=["largest", "smallest", "magnitude"],
        default="largest",
        help="algebraically largest or smallest, or largest in magnitude (default: largest)",
    )
    top.add_argument(
        "--tol",
        type=_positive_float,
        help="relative residual to reach (default: 1e-8 for float64 products, 1e-4 for float32)",
    )
    top.add_argument(
        "--no-vectors", action="store_true", help="save eigenvalues only, not the n x k vectors"
    )
    top.set_defaults(run=run_top)

    trace_parser = commands.add_parser(
        "trace",
        parents=[common],
        formatter_class=formatter,
        help="trace by Hutch++ or Hutchinson, with a standard error",
        description=_wrap(
            "Estimate tr(H) from --probes Hessian-vector products with Rademacher "
            "probes: Hutch++ (Meyer et al. 2021; a third sketches the top of the spectrum, whose "
            "trace is then exact) or Hutchinson. Prints the value with its standard error and "
            "writes trace.npz/.json (reload with curvscope.TraceEstimate.load)."
        ),
        epilog="examples:\n"
        "  curvscope trace\n"
        "  curvscope trace --probes 300 --method hutchinson\n" + COMMON_EPILOG,
    )
    trace_parser.add_argument(
        "--probes",
        type=_positive_int,
        default=99,
        help="Hessian-vector products in all (default: 99; hutch++ needs at least 6)",
    )
    trace_parser.add_argument(
        "--method",
        choices=["hutch++", "hutchinson"],
        default="hutch++",
        help="estimator (default: hutch++)",
    )
    trace_parser.set_defaults(run=run_trace)
    return parser


# --------------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


USER_ERRORS = (CLIError, ValueError, TypeError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvscope`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 for a usage or input error, 1 for any other failure,
        130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.threads:
            torch.set_num_threads(args.threads)
        return int(args.run(args))
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            traceback.print_exc()
        user = isinstance(error, USER_ERRORS)
        message = _one_line(error)
        if not user:
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
