"""The problem every command measures: model, data and loss from their import paths.

Loaded once (:func:`load_problem`), with the operator options and metadata the commands share.

Factories run with torch's RNG seeded by --seed (the caller's RNG state is restored), so the
same command builds the same model; under torchrun each rank walks its own shard of the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import Shard, is_distributed
from ..rng import preserved_rng
from . import explain
from .errors import PROG, CLIError, one_line
from .imports import load_callable, load_data, load_loss, load_model
from .threads import fit_threads

DTYPES = {"float64": torch.float64, "float32": torch.float32}
KEEP_GRAPHS: dict[str, bool | str] = {"auto": "auto", "all": True, "none": False}


@dataclasses.dataclass(frozen=True)
class ProblemDefaults:
    """What --model, --data and --loss mean when they are not given."""

    model: str
    data: str
    loss: str


#: The built-in problem of density, top, trace, decompose, overlap and blocks: a trained
#: digits MLP under cross-entropy on all 1,797 digits.
DIGITS = ProblemDefaults(
    "curvscope.zoo:trained_digits_mlp", "curvscope.zoo:digits_data", "cross_entropy"
)


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """The problem as the command line gives it (import paths and settings), not yet loaded.

    ``data_given`` says whether --data was on the command line (a model of the user's on the
    built-in data gets a note); ``fit_threads``, whether the threads are the program's
    default (a small model then gets one thread); ``command``, the command line recorded
    with the results.
    """

    model: str
    data: str
    loss: str
    unpack_batch: str | None = None
    params: list[str] | None = None
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    keep_graphs: str = "auto"
    allow_tf32: bool = False
    data_given: bool = False
    fit_threads: bool = False
    command: str = PROG

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, defaults: ProblemDefaults, **settings: Any
    ) -> ProblemSpec:
        """The problem of parsed options (:func:`~curvscope.cli.options.problem_parser`).

        --model, --data and --loss not given are ``defaults``; ``settings`` (a resumed run's)
        replace the options' values.
        """
        spec = cls(
            model=defaults.model if args.model is None else args.model,
            data=defaults.data if args.data is None else args.data,
            loss=defaults.loss if args.loss is None else args.loss,
            unpack_batch=args.unpack_batch,
            params=args.params,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed if args.seed is not None else 0,
            keep_graphs=args.keep_graphs,
            allow_tf32=args.allow_tf32,
            data_given=args.data is not None,
            fit_threads=getattr(args, "default_threads", False),
            command=shlex.join([PROG, *getattr(args, "argv", ())]),
        )
        return dataclasses.replace(spec, **settings)


@dataclasses.dataclass
class LoadedProblem:
    """Model, data and loss of a command, loaded from a :class:`ProblemSpec`.

    ``data`` is each rank's shard under torchrun; ``dtype`` and ``device`` are the products'
    (None: the operator's default).
    """

    spec: ProblemSpec
    model: nn.Module
    data: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    unpack: Callable[[Any], Any] | None
    device: torch.device | None
    dtype: torch.dtype | None

    def options(self, with_params: bool = True) -> dict[str, Any]:
        """Keyword arguments shared by every operator of the command."""
        options: dict[str, Any] = {
            "dtype": self.dtype,
            "device": self.device,
            "unpack_batch": self.unpack,
            "keep_graphs": KEEP_GRAPHS[self.spec.keep_graphs],
            "allow_tf32": self.spec.allow_tf32,
        }
        if with_params:
            options["params"] = self.spec.params
        return options

    def operator(self, cls: type, **kwargs: Any) -> Any:
        """``cls(model, loss_fn, data, **options)``: a curvature operator of the problem."""
        return cls(self.model, self.loss_fn, self.data, **{**self.options(), **kwargs})

    def meta(self, op: Any = None) -> dict[str, Any]:
        """What to record with a result.

        The import paths, the parameters, the command line, and with ``op`` its number of samples,
        device and class.
        """
        spec = self.spec
        meta: dict[str, Any] = {
            "model": spec.model,
            "data": spec.data,
            "loss": spec.loss,
            "params": spec.params if spec.params is not None else "all trainable",
        }
        if op is not None:
            meta["num_samples"] = op.num_samples
            meta["device"] = str(op.device)
            meta["operator"] = type(op).__name__
        meta["command"] = spec.command
        return meta

    def annotate(self, result: Any, op: Any = None, **extra: Any) -> Any:
        """A result (a frozen dataclass with ``meta``) with more metadata.

        Adds :meth:`meta` and ``extra`` to the result's metadata.
        """
        return dataclasses.replace(result, meta={**result.meta, **self.meta(op), **extra})

    def describe(self, op: Any, what: str = "Hessian") -> str:
        """``Hessian of mse over 1,000 samples, n = 3,466 parameters, float64 on cpu``."""
        samples = f"{op.num_samples:,} samples" if op.num_samples else "the data"
        dtype = str(op.dtype).replace("torch.", "")
        params = self.spec.params
        subset = "" if params is None else f" (params: {', '.join(params)})"
        return (
            f"{what} of {self.spec.loss} over {samples}, n = {op.num_params:,} parameters"
            f"{subset}, {dtype} on {op.device}"
        )


def load_problem(spec: ProblemSpec, shard: bool = True) -> LoadedProblem:
    """Load the model, data, loss and unpack hook of ``spec``, checked.

    Args:
        spec: The problem's import paths and settings.
        shard: Under torchrun, give each rank every world_size-th batch (products and sums
            are all-reduced), unless the data is a DataLoader with a DistributedSampler.

    Raises:
        CLIError: For an import path, a device or a parameter name that does not work.
    """
    device = check_device(spec.device)
    loss_fn = load_loss(spec.loss)
    # Factories that draw random numbers (initial weights) get the same ones on every run,
    # and the caller's global RNG state is left as it was.
    with preserved_rng():
        torch.manual_seed(spec.seed)
        model = load_model(spec.model)
        data = load_data(spec.data)
    unpack = load_callable(spec.unpack_batch, "--unpack-batch") if spec.unpack_batch else None
    check_params(model, spec.params)
    explain.remember(
        explain.LoadedData(
            data, unpack, spec.model, spec.data, spec.unpack_batch, data_given=spec.data_given
        )
    )
    if spec.fit_threads:
        fit_threads(model)
    if shard and is_distributed() and not sharded_by_sampler(data):
        data = Shard(data)
    dtype = DTYPES[spec.dtype] if spec.dtype else None
    return LoadedProblem(spec, model, data, loss_fn, unpack, device, dtype)


def check_device(name: str | None) -> torch.device | None:
    """The device --device names (None: the model's), refused where it is not available."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CLIError(f"--device {name!r} is not a device: {one_line(error)}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name!r}: MPS is not available here (use --device cpu)")
    return device


def check_params(model: nn.Module, params: Sequence[str] | None) -> None:
    """Refuse --params that name no parameter of the model."""
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


def sharded_by_sampler(data: Any) -> bool:
    """A DataLoader with a DistributedSampler already hands each rank its own shard."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler)


def num_outputs(op: Any) -> int | None:
    """C of a model returning (B, C) outputs on the operator's first batch, else None."""
    with torch.no_grad():
        outputs = op.function.outputs(op.source.first())
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and outputs.shape[1] >= 2:
        return int(outputs.shape[1])
    return None


def operator_class(name: str) -> type:
    """The operator class of --operator: "hessian", "ggn" (Gauss-Newton), "fisher".

    "fisher" is the Monte-Carlo Fisher with one label per sample, seed 0; "empirical-fisher"
    uses the true labels (docs/fisher.md).
    """
    from ..operators import EmpiricalFisherOperator, FisherOperator, GGNOperator, HessianOperator

    return {
        "hessian": HessianOperator,
        "ggn": GGNOperator,
        "fisher": FisherOperator,
        "empirical-fisher": EmpiricalFisherOperator,
    }[name]


#: What --operator names, in the commands' printed lines.
OPERATOR_TITLES = {
    "hessian": "Hessian",
    "ggn": "Gauss-Newton matrix",
    "fisher": "Fisher (sampled labels)",
    "empirical-fisher": "empirical Fisher",
}


def operator_products(name: str) -> str:
    """How the products of --operator NAME are called: "Hessian-vector products", ..."""
    return "Hessian-vector products" if name == "hessian" else f"{OPERATOR_TITLES[name]} products"
