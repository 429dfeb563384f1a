"""What the commands share on the command line and around it.

Number types, option groups (the problem, SLQ, eigenpairs, --operator), the results folder, progress
bars, and the one rank-0 policy under torchrun (:func:`rank0_output`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import is_distributed, is_main_process
from .errors import CLIError, one_line
from .jsonout import json_option
from .problem import DTYPES, KEEP_GRAPHS, ProblemDefaults

#: Default residual tolerance of eigenpairs per product dtype (float32 products are noisy at
#: about 1e-7 relative, so 1e-8 is out of their reach).
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}

COMMON_EPILOG = """
import paths:
  --model mymodels:build    mymodels.py in the current folder (or importable), build() -> nn.Module
  --data  mymodels:batches  batches() -> list or DataLoader of (inputs, targets), walked per product
  --loss  mymodels:loss     loss(outputs, targets) -> the batch's mean loss (a scalar tensor)
"""

FORMATTER = argparse.RawDescriptionHelpFormatter


class CLIParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one-line :class:`CLIError`.

    Options are never abbreviated (``allow_abbrev=False``): ``top --k 3`` is refused as an
    unknown option instead of being read as ``--keep-graphs 3``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise a :class:`CLIError` pointing to --help instead of exiting (argparse's default)."""
        raise CLIError(f"{message} (see '{self.prog} --help')")


def wrap(text: str) -> str:
    """A command's description, filled to 88 columns."""
    return textwrap.fill(text, width=88)


def _bounded(
    convert: Callable[[str], Any], noun: str, lowest: float, strict: bool
) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, refused with a one-line reason below ``lowest``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < lowest or (strict and not value > lowest):
            bound = "positive" if strict else f"at least {lowest:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


positive_int = _bounded(int, "an integer", 1, strict=False)
nonnegative_int = _bounded(int, "an integer", 0, strict=False)
positive_float = _bounded(float, "a number", 0.0, strict=True)


# --------------------------------------------------------------------------- option groups


def problem_parser(
    defaults: ProblemDefaults,
    out_help: str = "results folder (default: results/COMMAND)",
    seed: int | None = 0,
) -> argparse.ArgumentParser:
    """The parent parser of the problem and output options every measuring command takes.

    --model, --data and --loss are None when not given (:meth:`ProblemSpec.from_args`
    resolves them to ``defaults``), so a command can tell a given option from a default;
    ``seed=None`` does the same for --seed (``track --resume`` takes it from the run).
    """
    common = CLIParser(add_help=False)
    group = common.add_argument_group("problem (default: the built-in digits MLP)")
    group.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help=f"import path of an nn.Module or a factory returning one (default: {defaults.model})",
    )
    group.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="import path of a re-iterable of (inputs, targets) batches (list, DataLoader) or "
        f"a factory returning one (default: {defaults.data})",
    )
    group.add_argument(
        "--loss",
        metavar="LOSS",
        help="cross_entropy, mse (integer targets one-hot encoded), or an import path "
        f"MODULE:FN of fn(outputs, targets) -> mean loss (default: {defaults.loss})",
    )
    group.add_argument(
        "--unpack-batch",
        metavar="MODULE:FN",
        help="import path of fn(batch) -> (inputs, targets) for batches that are not pairs "
        "(dicts, say); inputs may be a tensor, a tuple (model(*inputs)) or a dict "
        "(model(**inputs))",
    )
    group.add_argument(
        "--keep-graphs",
        nargs="?",
        const="all",
        default="auto",
        choices=list(KEEP_GRAPHS),
        help="keep batches' gradient graphs across Hessian products (about 2 instead of 3 "
        "gradients per product, bit-identical): auto (default) keeps those that fit in a "
        "quarter of the available memory, all keeps every one, none rebuilds them each time",
    )
    group.add_argument(
        "--allow-tf32",
        action="store_true",
        help="let float32 products use TF32/bf16 where torch's settings allow it (faster on "
        "recent GPUs, ~1e-3 relative error); default: full IEEE float32 during products",
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
        "--seed", type=int, default=seed, help="seed of probes and of the factories (default: 0)"
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: 1 for models below 100,000 trainable parameters, "
        "else the CPUs this process may use; unless OMP_NUM_THREADS is set. Idle threads "
        "sleep unless OMP_WAIT_POLICY is set)",
    )
    group.add_argument("--out", metavar="DIR", help=out_help)
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on a terminal only)"
    )
    json_option(group)
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return common


def slq_options(
    parser: argparse.ArgumentParser, iters: int, probes: int, vectors: str = "random start vectors"
) -> None:
    """--iters and --probes of stochastic Lanczos quadrature."""
    parser.add_argument(
        "--iters",
        type=positive_int,
        default=iters,
        help=f"Lanczos steps per probe (default: {iters})",
    )
    parser.add_argument(
        "--probes", type=positive_int, default=probes, help=f"{vectors} (default: {probes})"
    )


def structure_options(parser: argparse.ArgumentParser) -> None:
    """--gap-factor of the structure summaries and --convention of the density figures."""
    parser.add_argument(
        "--gap-factor",
        type=positive_float,
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


def eigenpair_options(
    parser: argparse.ArgumentParser, which: Sequence[str], which_help: str
) -> None:
    """--which (``which`` choices, the first the default), --tol and --no-vectors."""
    parser.add_argument("--which", choices=list(which), default=which[0], help=which_help)
    parser.add_argument(
        "--tol",
        type=positive_float,
        help="relative residual to reach (default: 1e-8 for float64 products, 1e-4 for float32)",
    )
    parser.add_argument(
        "--no-vectors", action="store_true", help="save eigenvalues only, not the n x k vectors"
    )


def tolerance(args: argparse.Namespace, dtype: torch.dtype) -> float:
    """--tol, else :data:`DEFAULT_TOL` of the products' dtype."""
    return args.tol if args.tol is not None else DEFAULT_TOL.get(dtype, 1e-4)


def operator_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--operator hessian|ggn|fisher|empirical-fisher (:func:`~.problem.operator_class`).

    ``what`` says what it is used for.
    """
    choices = ["hessian", "ggn", "fisher", "empirical-fisher"]
    parser.add_argument("--operator", choices=choices, default="hessian", help=what)


# --------------------------------------------------------------------------- output


#: Where this process writes instead of --out: a temporary folder on ranks > 0 under torchrun
#: (:func:`rank0_output`), empty otherwise.
_scratch: list[Path] = []


@contextlib.contextmanager
def rank0_output() -> Iterator[None]:
    """The one rank-0 policy: under torchrun every rank runs the command, rank 0 shows it.

    Products and class sums are all-reduced, so all ranks compute the same numbers. The other ranks
    print nothing (their stdout and stderr go nowhere; an error still reaches the terminal) and
    :func:`out_dir` gives them a temporary folder, removed afterwards. What a rank keeps for itself
    (its density checkpoint, its tracked run folder) stays where the command puts it.
    """
    if not is_distributed() or is_main_process():
        yield
        return
    with (
        tempfile.TemporaryDirectory(prefix="curvscope-rank") as scratch,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        _scratch.append(Path(scratch))
        try:
            yield
        finally:
            _scratch.pop()


def results_dir(args: argparse.Namespace) -> Path:
    """--out, or results/COMMAND: the folder the command's results go to."""
    return Path(args.out) if args.out else Path("results") / args.command


def out_dir(args: argparse.Namespace) -> Path:
    """The folder this process writes its results to, checked and created.

    That is :func:`results_dir`, or a temporary one on ranks > 0 (see :func:`rank0_output`).
    """
    out = results_dir(args)
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(
            f"--out {str(out)!r}: cannot create the folder ({error.strerror or one_line(error)})"
            ": choose a folder you can write to"
        ) from error
    return _scratch[-1] if _scratch else out


def check_out(out: Path) -> None:
    """Refuse an --out that is a file or lies under one (``results.txt/run``)."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == out else f": {str(folder)!r} is a file"
                raise CLIError(
                    f"--out {str(out)!r} is {'a file' if folder == out else 'under a file'}, "
                    f"not a folder{where}; choose a folder"
                )
            return


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar unless --no-progress, and only on a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def progress(args: argparse.Namespace, **kwargs: Any) -> tqdm:
    """A tqdm bar that :func:`show_progress` allows and that leaves no line behind."""
    return tqdm(disable=not show_progress(args), leave=False, **kwargs)


class ProgressOperator:
    """Pass-through operator that advances a progress bar by the vectors it multiplies."""

    def __init__(self, operator: Any, bar: tqdm) -> None:
        self.operator = operator
        self.bar = bar
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``operator.matmat(V)`` for V of shape (n, k); the bar advances by k."""
        out = self.operator.matmat(V)
        self.bar.update(V.shape[1])
        return out
