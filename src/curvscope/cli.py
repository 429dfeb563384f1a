"""The ``curvscope`` command: Hessian density, top eigenpairs and trace of a model's loss, and
its curvature tracked during training (``track``) with the figures of a run (``plot``).

Models, data and losses are given as import paths ``package.module:name`` (as uvicorn and
Lightning take them); the built-in digits problem of :mod:`curvscope.zoo` is the default.
Every failure the user can fix ends in one line ``curvscope: error: ...`` on stderr and exit
status 2 (``--debug`` shows the traceback as well); anything else exits with status 1. Ctrl-C
and SIGTERM end a command in order, at any point, with one line and status 130 or 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .distributed import Shard, init_from_environment, is_distributed, is_main_process, rank
from .losses import LOSSES

PROG = "curvscope"
DEFAULT_MODEL = "curvscope.zoo:trained_digits_mlp"
DEFAULT_DATA = "curvscope.zoo:digits_data"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
KEEP_GRAPHS: dict[str, bool | str] = {"auto": "auto", "all": True, "none": False}
#: Default residual tolerance of ``top`` per product dtype (float32 products are noisy at
#: about 1e-7 relative, so 1e-8 is out of their reach).
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


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
        owner = module_name if i == 0 else ".".join([module_name, *attr.split(".")[:i]])
        try:
            found = hasattr(obj, part)
        except Exception as error:  # a lazy attribute (module __getattr__) that fails to load
            raise CLIError(
                f"{option} {spec!r}: getting {part!r} from {owner} failed: {_one_line(error)}"
            ) from error
        if not found:
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            own = [n for n in public if _defined_in(obj, n, owner)]
            public = own or public
            hint = f"; it has {', '.join(public[:12])}{', ...' if len(public) > 12 else ''}"
            raise CLIError(f"{option} {spec!r}: {owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def _defined_in(obj: Any, name: str, owner: str) -> bool:
    """True when ``obj.name`` was defined in module ``owner`` (False when reading it fails:
    the hint of an error message must not raise)."""
    try:
        return getattr(getattr(obj, name), "__module__", None) == owner
    except Exception:
        return False


def _import_module(module_name: str, spec: str, option: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    loaded = _loaded_as_file(module_name)
    if loaded is not None:
        return loaded
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


#: Modules loaded from ``path/to/file.py`` import paths, by resolved path: each file runs once
#: per process however many options name it, so its module-level state is shared as when a
#: module is imported.
_FILE_MODULES: dict[Path, ModuleType] = {}


def _load_file(path: Path, spec: str, option: str) -> ModuleType:
    if not path.is_file():
        raise CLIError(f"{option} {spec!r}: there is no file {str(path)!r}")
    resolved = path.resolve()
    module = _FILE_MODULES.get(resolved) or _imported_from(resolved)
    if module is not None:
        _FILE_MODULES[resolved] = module
        return module
    name = f"_curvscope_user_{path.stem}"
    if name in sys.modules:  # another file of the same name: a name of its own
        name += "_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"{option} {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise CLIError(f"{option} {spec!r}: running {path} failed: {_one_line(error)}") from error
    _FILE_MODULES[resolved] = module
    return module


def _loaded_as_file(module_name: str) -> ModuleType | None:
    """The module a ``path/to/file.py`` import path loaded, when importing ``module_name``
    would run that same file again (``--model mymodels.py:build --data mymodels:batches``)."""
    if not _FILE_MODULES or module_name in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(module_name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    except Exception:  # import_module reports it
        return None
    module = _FILE_MODULES.get(origin) if origin is not None else None
    if module is not None:
        sys.modules[module_name] = module
    return module


def _imported_from(path: Path) -> ModuleType | None:
    """A module already imported from the file ``path`` (``--data mymodels:batches`` before
    ``--model mymodels.py:build``), or None."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.basename(file) == path.name:
            try:
                if Path(file).resolve() == path:
                    return module
            except OSError:
                continue
    return None


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


# --------------------------------------------------------------------------- data messages

#: Import paths of the built-in data that --data defaults to (density/top/..., and track).
BUILTIN_DATA = (DEFAULT_DATA, "curvscope.zoo:digits_subset")
#: The default models, which are built for that data.
BUILTIN_MODELS = (DEFAULT_MODEL, "curvscope.zoo:digits_mlp")


def _given_on_command_line(args: argparse.Namespace, option: str) -> bool:
    return any(t == option or t.startswith(option + "=") for t in getattr(args, "argv", []))


def _on_default_data(args: argparse.Namespace) -> bool:
    """A model of the user's (--model given) on the built-in digits, --data not given."""
    return (
        args.model not in BUILTIN_MODELS
        and args.data in BUILTIN_DATA
        and not _given_on_command_line(args, "--data")
    )


def _first_batch(data: Any) -> Any:
    """The first raw batch of ``data``; raises whatever walking the data raises."""
    for batch in data:
        return batch
    raise ValueError("the data yielded no batches")


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _describe_tensors(obj: Any) -> str:
    """``float32 (256, 64)`` for a tensor, ``{'x': uint8 (16, 8)}`` for a dict, and so on."""
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).replace('torch.', '')} {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_describe_tensors(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(_describe_tensors(v) for v in obj) + ")"
    return type(obj).__name__


def describe_data(data: Any) -> str:
    """Samples, batches and batch 0's tensors of a list of (inputs, targets) pairs.

    Example: ``1,797 samples in 8 batches; batch 0: inputs float32 (256, 64), targets int64
    (256,)``. Only for the built-in data (a list): other data is not walked for a message.
    """
    from .operators.data import first_tensor

    batches = list(data) if isinstance(data, (list, tuple)) else []
    if not batches or not all(_is_pair(b) for b in batches):
        return "batches of the built-in data"
    sizes = [first_tensor(b[1]) for b in batches]
    counted = ""
    if all(t is not None and t.ndim > 0 for t in sizes):
        counted = f"{sum(int(t.shape[0]) for t in sizes):,} samples in {len(batches)} batches; "
    inputs, targets = batches[0]
    return (
        f"{counted}batch 0: inputs {_describe_tensors(inputs)}, targets "
        f"{_describe_tensors(targets)}"
    )


def remember_data(args: argparse.Namespace, data: Any, unpack: Callable[[Any], Any] | None) -> None:
    """Keep the loaded data on ``args`` for :func:`explain_failure`, and say on stderr when a
    model of the user's gets the built-in digits because --data was not given."""
    args.loaded_data = (data, unpack)
    if _on_default_data(args) and not args.model.startswith("curvscope.zoo:") and is_main_process():
        print(
            f"{PROG}: note: --data not given: --model {args.model} gets the built-in digits "
            f"data {args.data} ({describe_data(data)}); pass your model's own data with "
            "--data MODULE:FACTORY",
            file=sys.stderr,
        )


def _raised_outside_curvscope(error: BaseException) -> bool:
    """True when the innermost frame of the error is not curvscope's (torch, the model, the
    loss): not one of curvscope's own checks."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    package = Path(__file__).resolve().parent
    return package not in Path(frames[-1].filename).resolve().parents


def _uint8_tensors(obj: Any, where: str = "inputs") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every uint8 tensor in a (nested) tensor, tuple, list or dict."""
    if isinstance(obj, torch.Tensor):
        return [(where, obj)] if obj.dtype == torch.uint8 else []
    if isinstance(obj, dict):
        items = [(f"{where}[{key!r}]", value) for key, value in obj.items()]
    elif isinstance(obj, (tuple, list)):
        items = [(f"{where}[{i}]", value) for i, value in enumerate(obj)]
    else:
        return []
    return [found for name, value in items for found in _uint8_tensors(value, name)]


def explain_failure(error: BaseException, args: argparse.Namespace) -> CLIError | None:
    """A command-line explanation of a failure caused by the data, or None.

    Looks at batch 0 of the data loaded by :func:`remember_data` (after the failure only) for
    three mistakes: a batch that is not an (inputs, targets) pair without --unpack-batch,
    uint8 inputs (image bytes), and a model of the user's fed the built-in digits because
    --data was not given. The last two only explain errors raised by torch, the model or the
    loss, not by curvscope's own checks.
    """
    loaded = getattr(args, "loaded_data", None)
    if loaded is None or isinstance(error, CLIError):
        return None
    from .operators.data import default_unpack

    data, unpack = loaded
    try:
        batch = _first_batch(data)
    except Exception:
        return None
    failure = f"{type(error).__name__}: {_one_line(error)}"
    if unpack is None and not _is_pair(batch):
        if isinstance(error, ValueError) and "unpack_batch" in str(error):
            size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            return CLIError(
                f"--data {args.data}: a batch is a {type(batch).__name__}{size}, not an "
                "(inputs, targets) pair: pass --unpack-batch MODULE:FN, a function fn(batch) "
                "-> (inputs, targets) (inputs may be a tensor, a tuple of positional inputs or "
                "a dict of keyword inputs)"
            )
        return None
    if not _raised_outside_curvscope(error):
        return None
    try:
        inputs, _ = (unpack or default_unpack)(batch)
    except Exception:
        return None
    found = _uint8_tensors(inputs)
    if found:
        name, tensor = found[0]
        place = f"the data factory (--data {args.data})"
        if args.unpack_batch:
            place += f" or in --unpack-batch {args.unpack_batch}"
        return CLIError(
            f"the model failed on uint8 inputs (batch 0's {name} are uint8 of shape "
            f"{tuple(tensor.shape)}): {failure}. Convert the inputs to floating point in "
            f"{place}, e.g. x.float() / 255 for 0-255 pixel values"
        )
    if _on_default_data(args):
        return CLIError(
            f"--model {args.model} failed on the built-in digits data that --data defaults to "
            f"({args.data}: {describe_data(data)}): {failure}. Pass your model's own data with "
            "--data MODULE:FACTORY"
        )
    return None


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


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, nn.Module, Any, Any]:
    """(device, loss_fn, model, data, unpack_batch) from the common options, checked."""
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
    remember_data(args, data, unpack)
    fit_threads_to_model(args, model)
    return device, loss_fn, model, data, unpack


def build_problem(args: argparse.Namespace) -> Problem:
    """Load model, data and loss, and build the Hessian operator (one data pass)."""
    from .operators import HessianOperator

    device, loss_fn, model, data, unpack = load_inputs(args)
    if is_distributed() and not _sharded_by_sampler(data):
        data = Shard(data)  # every rank walks every world_size-th batch; products all-reduced
    operator = HessianOperator(
        model,
        loss_fn,
        data,
        params=args.params,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=device,
        unpack_batch=unpack,
        keep_graphs=KEEP_GRAPHS[getattr(args, "keep_graphs", "auto")],
        allow_tf32=getattr(args, "allow_tf32", False),
    )
    command = shlex.join([PROG, *args.argv])
    return Problem(operator, args.model, args.data, args.loss, args.params, command)


def _sharded_by_sampler(data: Any) -> bool:
    """A DataLoader with a DistributedSampler already hands each rank its own shard."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler)


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
    return not args.no_progress and sys.stderr.isatty() and is_main_process()


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("results") / args.command
    _check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(
            f"--out {str(out)!r}: cannot create the folder ({error.strerror or _one_line(error)})"
            ": choose a folder you can write to"
        ) from error
    return out


def _check_out(out: Path) -> None:
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


def _with_meta(result: Any, problem: Problem) -> Any:
    return dataclasses.replace(result, meta={**result.meta, **problem.meta()})


def _paths(*paths: Path) -> str:
    return ", ".join(str(p) for p in paths)


# --------------------------------------------------------------------------- commands


def _checkpoint_dir(out: Path) -> Path:
    """OUT/checkpoint, or OUT/checkpoint/rankR under torchrun: every rank keeps its own
    (identical) Lanczos state, so no two processes write one file."""
    folder = out / "checkpoint"
    return folder / f"rank{rank()}" if is_distributed() else folder


def parameters_sha256(op: Any) -> str:
    """sha256 of the analysed parameters' names, dtypes, shapes and values (the model's own
    tensors, before any cast to the product dtype): 2.3 ms for 1M float32 parameters, 4.7 ms
    for float64, on one CPU thread."""
    digest = hashlib.sha256()
    function = getattr(op, "function", None)
    named = dict(function.model.named_parameters()) if function is not None else {}
    for name in getattr(function, "names", []):
        tensor = named[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def density_identity(args: argparse.Namespace, op: Any) -> dict[str, Any]:
    """What a density checkpoint measures, stored with it and compared on ``--resume``: the
    model, data and loss as given, the operator, analysed parameters and dtype, --iters,
    --probes, --seed, and a hash of the parameters' values (a model file edited between the
    runs, or a factory with another seed, gives another Hessian under the same names)."""
    return {
        "command": "density",
        "model": args.model,
        "data": args.data,
        "loss": args.loss,
        "unpack_batch": args.unpack_batch,
        "operator": type(op).__name__,
        "params": list(args.params) if args.params is not None else None,
        "dtype": str(op.dtype).replace("torch.", ""),
        "iters": args.iters,
        "probes": args.probes,
        "seed": args.seed,
        "parameters_sha256": parameters_sha256(op),
    }


def run_density(args: argparse.Namespace) -> int:
    from .linalg import spectral_density, top_eigenpairs
    from .plot import plot_density

    out = _out_dir(args)
    started = time.perf_counter()
    problem = build_problem(args)
    op = problem.operator
    checkpoint: dict[str, Any] = {}
    if args.checkpoint or args.resume:
        folder = _checkpoint_dir(out)
        if args.resume and not (folder.is_dir() and any(folder.iterdir())):
            print(
                f"{PROG}: note: --resume: {folder} holds no checkpoint yet; the run starts "
                "from the beginning (and is checkpointed there)",
                file=sys.stderr,
            )
        checkpoint = {
            "checkpoint_dir": folder,
            "resume": args.resume,
            "identity": density_identity(args, op),
        }
    density = spectral_density(
        op,
        num_iters=args.iters,
        num_probes=args.probes,
        seed=args.seed,
        basis=args.basis,
        progress=_show_progress(args),
        **checkpoint,
    )
    if args.mark_top:
        pairs = _with_meta(top_eigenpairs(op, k=args.mark_top, seed=args.seed), problem)
    if not is_main_process():
        return 0  # under torchrun every rank computed the same numbers; rank 0 writes them
    density = _with_meta(density, problem)
    files = list(density.save(out / "density"))
    if args.mark_top:
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
    if not is_main_process():
        return 0
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
    if not is_main_process():
        return 0
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


# --------------------------------------------------------------------------- track and plot

DEFAULT_TRACK_MODEL = "curvscope.zoo:digits_mlp"
DEFAULT_TRACK_DATA = "curvscope.zoo:digits_subset"
#: Measurements ``track`` knows, in the order they run (stability reuses top's lambda_max,
#: stochastic_edge needs the density).
TRACK_MEASUREMENTS = ("top", "trace", "density", "stability", "ntk", "stochastic_edge")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
#: Learning rate of ``track`` when --lr is not given: the edge-of-stability regime of the
#: default problem (full-batch GD reaches 2/eta = 1 from an initial sharpness of 0.57).
DEFAULT_LR = {"sgd": 2.0, "momentum": 0.2, "nesterov": 0.2, "adam": 0.01}
#: Threshold names of the log line, per --optimizer (curvscope.analysis.stability).
THRESHOLD_NAMES = {
    "sgd": "2/eta",
    "momentum": "2(1+beta)/eta",
    "nesterov": "2(1+beta)/((1+2beta)eta)",
    "adam": "Adam threshold",
}
#: The training state ``track`` keeps beside the run store, replaced atomically before every
#: snapshot (the state of the snapshot's step) and at the end, so every committed snapshot can
#: be resumed from and ``--resume`` continues from the last one.
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_FORMAT = "curvscope-track-state"


def _measurements(text: str) -> list[str]:
    from .tracking import MEASUREMENTS

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CLIError("--measure is empty: name at least one of " + ",".join(TRACK_MEASUREMENTS))
    unknown = [name for name in names if name not in MEASUREMENTS]
    if unknown:
        raise CLIError(
            f"--measure: unknown measurement {', '.join(map(repr, unknown))}; choose from "
            + ",".join(TRACK_MEASUREMENTS)
        )
    if "stochastic_edge" in names and "density" not in names:
        raise CLIError(
            "--measure stochastic_edge needs density (K is summed over the SLQ density): "
            "add density, e.g. --measure top,density,stochastic_edge"
        )
    known = [name for name in TRACK_MEASUREMENTS if name in names]
    return known + [name for name in dict.fromkeys(names) if name not in TRACK_MEASUREMENTS]


def _run_dir(args: argparse.Namespace) -> Path:
    if args.out is None:
        if args.resume:
            raise CLIError("--resume needs --out RUN_DIR: the run folder to continue")
        return Path("results") / "track" / time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    _check_out(out)
    if (out / "run.json").exists() and not args.resume:
        raise CLIError(
            f"--out {str(out)!r} already holds a run: pass --resume to continue it, or choose a "
            "new folder"
        )
    if out.is_dir() and not (out / "run.json").exists() and any(out.iterdir()):
        raise CLIError(
            f"--out {str(out)!r} holds files but no run (no run.json: not a folder of curvscope "
            f"track{', so there is nothing to resume' if args.resume else ''}): choose a new or "
            "empty folder"
        )
    return out


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _num_samples(targets: Any, inputs: Any) -> int:
    for part in (targets, inputs):
        if isinstance(part, torch.Tensor) and part.ndim > 0:
            return int(part.shape[0])
    raise CLIError(
        "cannot count the samples of a batch: its targets (or inputs) must be a tensor whose "
        "first dimension is the batch"
    )


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    return value


class TrainingSet:
    """The training data of ``track``: the batches as given, and one tensor pair for SGD.

    Full-batch steps walk the batches (each weighted by its size, so the step is the gradient
    of the mean loss over every sample, as the Hessian is). Minibatch steps draw batch t of
    epoch e = t // (N // B) from a permutation seeded by (seed, e), without replacement and
    dropping the last N mod B samples: the batch of a step depends on nothing but the step,
    so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        data: Any,
        unpack: Callable[[Any], Any] | None,
        batch_size: int | None,
        seed: int,
        device: torch.device | None,
    ) -> None:
        try:
            batches = list(data)
        except TypeError:
            raise CLIError("--data gave no iterable of batches") from None
        pairs = []
        for batch in batches:
            pair = unpack(batch) if unpack is not None else batch
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CLIError(
                    "--data: a batch is not an (inputs, targets) pair: pass --unpack-batch "
                    "MODULE:FN returning (inputs, targets)"
                )
            pairs.append((_to(pair[0], device), _to(pair[1], device)))
        if not pairs:
            raise CLIError("--data yielded no batches: pass a non-empty list or DataLoader")
        self.batches = pairs
        self.sizes = [_num_samples(targets, inputs) for inputs, targets in pairs]
        self.num_samples = sum(self.sizes)
        self.seed = seed
        self.batch_size = batch_size
        if batch_size is not None:
            if batch_size > self.num_samples:
                raise CLIError(
                    f"--batch-size {batch_size} exceeds the {self.num_samples} training samples"
                )
            if not all(isinstance(part, torch.Tensor) for pair in pairs for part in pair):
                raise CLIError(
                    "--batch-size needs batches of tensors (inputs, targets) to draw "
                    "minibatches from; leave it out for full-batch steps"
                )
            self.inputs = torch.cat([inputs for inputs, _ in pairs])
            self.targets = torch.cat([targets for _, targets in pairs])
            self.per_epoch = self.num_samples // batch_size
            self._epoch = -1
            self._order = torch.empty(0, dtype=torch.long)

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None

    def batch(self, step: int) -> tuple[Any, Any]:
        """The minibatch of training step ``step``."""
        assert self.batch_size is not None
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        index = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        index = index.to(self.inputs.device)
        return self.inputs[index], self.targets[index]

    def step(
        self, step: int, model: nn.Module, loss_fn: Callable[..., Any], optimizer: Any
    ) -> float:
        """One optimizer step; returns the (mini)batch loss."""
        optimizer.zero_grad(set_to_none=True)
        if self.full_batch:
            total = 0.0
            for (inputs, targets), size in zip(self.batches, self.sizes, strict=True):
                loss = loss_fn(_forward(model, inputs), targets) * (size / self.num_samples)
                loss.backward()
                total += float(loss.detach())
        else:
            inputs, targets = self.batch(step)
            loss = loss_fn(_forward(model, inputs), targets)
            loss.backward()
            total = float(loss.detach())
        if not np.isfinite(total):
            raise CLIError(
                f"the training loss is {total} at step {step}: the run diverged; lower --lr "
                "(the run folder keeps every snapshot taken before)"
            )
        optimizer.step()
        return total

    def evaluate(self, model: nn.Module, loss_fn: Callable[..., Any]) -> dict[str, float]:
        """Mean loss over every sample (and accuracy for class targets); buffers and the RNG
        state (dropout) restored, so a resumed run that skips an evaluation draws the same
        numbers as an uninterrupted one."""
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        loss, correct, classify = 0.0, 0, True
        cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for (inputs, targets), size in zip(self.batches, self.sizes, strict=True):
                outputs = _forward(model, inputs)
                loss += float(loss_fn(outputs, targets)) * size
                classify = classify and (
                    isinstance(targets, torch.Tensor)
                    and not targets.is_floating_point()
                    and targets.ndim == 1
                    and outputs.ndim == 2
                )
                if classify:
                    correct += int((outputs.argmax(dim=1) == targets).sum())
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        scalars = {"loss": loss / self.num_samples}
        if classify:
            scalars["accuracy"] = correct / self.num_samples
        return scalars


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """The torch optimizer of --optimizer with --lr and --momentum."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    if args.optimizer in ("momentum", "nesterov"):
        return torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, nesterov=args.optimizer == "nesterov"
        )
    return torch.optim.Adam(params, lr=args.lr, betas=(args.momentum, 0.999))


def _save_train_state(
    path: Path, step: int, model: nn.Module, optimizer: Any, train: dict[str, Any]
) -> None:
    """Replace ``path`` atomically with the state before training step ``step``."""
    import io

    from .results import _atomic_write

    buffer = io.BytesIO()
    torch.save(
        {
            "format": TRAIN_STATE_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "train": train,
        },
        buffer,
    )
    _atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _load_train_state(path: Path, model: nn.Module, optimizer: Any, train: dict[str, Any]) -> int:
    """Load the state saved by :func:`_save_train_state`; returns its step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CLIError(f"cannot read {path}: {_one_line(error)}") from error
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CLIError(f"{path} is not a training state written by curvscope track")
    if state.get("train") != train:
        raise CLIError(
            f"cannot resume from {path}: it was written with other training settings "
            f"({state.get('train')}); resume with the same settings"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def track_line(step: int, scalars: dict[str, Any], threshold_name: str) -> str:
    """One log line of a snapshot: loss, sharpness against its threshold, traces, K, time."""
    parts = [f"step {step}"]
    if "loss" in scalars:
        parts.append(f"loss {_fmt(scalars['loss'])}")
    if "accuracy" in scalars:
        parts.append(f"acc {scalars['accuracy']:.3f}")
    if "sharpness" in scalars:
        parts.append(
            f"sharpness {_fmt(scalars['sharpness'])} / {threshold_name} "
            f"{_fmt(scalars['stability_threshold'])} = {scalars['edge_ratio']:.3f}"
        )
    elif "lambda_max" in scalars:
        parts.append(f"lambda_max {_fmt(scalars['lambda_max'])}")
    if "trace" in scalars:
        parts.append(f"tr(H) {_fmt(scalars['trace'])} ± {_two_digits(scalars['trace_std_error'])}")
    if "ntk_trace" in scalars:
        parts.append(f"tr(NTK) {_fmt(scalars['ntk_trace'])}")
    if "stochastic_K" in scalars:
        parts.append(f"K {_fmt(scalars['stochastic_K'])}")
    parts.append(f"({scalars.get('time_total_s', 0.0):.2f} s)")
    return "  ".join(parts)


def _given(args: argparse.Namespace) -> set[str]:
    """Destinations of the options written on the command line (abbreviations are off)."""
    given = set()
    for dest, strings in args.option_strings.items():
        for token in args.argv:
            if any(token == o or token.startswith(o + "=") for o in strings if o.startswith("-")):
                given.add(dest)
    return given


def _resume_defaults(args: argparse.Namespace, out: Path) -> None:
    """With --resume, take every setting not given on the command line from the run folder."""
    import json

    try:
        config = json.loads((out / "run.json").read_text()).get("config", {})
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot read {out / 'run.json'}: {_one_line(error)}") from error
    extra = config.get("extra", {})
    train = extra.get("train")
    if not isinstance(train, dict):
        raise CLIError(
            f"{out} was not written by curvscope track (no training settings in run.json): "
            "resume it from the loop that wrote it"
        )
    stored = {
        "model": train.get("model"),
        "data": train.get("data"),
        "loss": train.get("loss"),
        "optimizer": train.get("optimizer"),
        "lr": train.get("lr"),
        "momentum": train.get("momentum") if train.get("optimizer") != "sgd" else None,
        "batch_size": train.get("batch_size"),
        "seed": train.get("seed"),
        "schedule": config.get("schedule"),
        "measure": ",".join(config.get("measurements", [])),
        "top_k": config.get("top_k"),
        "trace_probes": config.get("trace_probes"),
        "density_iters": config.get("density_iters"),
        "density_probes": config.get("density_probes"),
        "dtype": config.get("dtype"),
        "params": config.get("params"),
        "ntk_method": extra.get("ntk_method"),
        "ntk_probes": extra.get("ntk_probes"),
    }
    given = _given(args)
    for dest, value in stored.items():
        if dest not in given:
            setattr(args, dest, value)


def run_track(args: argparse.Namespace) -> int:
    from .tracking import Schedule, Tracker

    started = time.perf_counter()
    if args.resume and args.out is not None and (Path(args.out) / "run.json").is_file():
        _resume_defaults(args, Path(args.out))
    measurements = _measurements(args.measure)
    schedule = Schedule.parse(args.schedule)
    if args.momentum is not None and args.optimizer == "sgd":
        raise CLIError("--momentum is for --optimizer momentum, nesterov or adam (beta1), not sgd")
    args.momentum = 0.9 if args.momentum is None else args.momentum
    if not 0 <= args.momentum < 1:
        raise CLIError(f"--momentum must lie in [0, 1), got {args.momentum}")
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.optimizer == "adam" and "stability" in measurements and schedule.due(0):
        raise CLIError(
            "--measure stability with adam needs Adam's second moments, which exist from step 1 "
            "on: start the schedule at step 1 (e.g. --schedule every:25:1 or log:1:1000:10)"
        )
    out = _run_dir(args)
    device, loss_fn, model, data, unpack = load_inputs(args)
    if device is not None:
        model.to(device)
    training = TrainingSet(data, unpack, args.batch_size, args.seed, device)
    batch_size = args.batch_size or training.num_samples
    optimizer = build_optimizer(args, model)
    train = {
        "model": args.model,
        "data": args.data,
        "loss": args.loss,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum if args.optimizer != "sgd" else 0.0,
        "batch_size": args.batch_size,
        "num_samples": training.num_samples,
        "seed": args.seed,
    }
    options: dict[str, Any] = {
        "keep_graphs": KEEP_GRAPHS[args.keep_graphs],
        "allow_tf32": args.allow_tf32,
    }
    if unpack is not None:
        options["unpack_batch"] = unpack
    if device is not None:
        options["device"] = device
    tracker = Tracker(
        out,
        loss_fn,
        training.batches,
        schedule=schedule,
        measurements=measurements,
        top_k=args.top_k,
        density_iters=args.density_iters,
        density_probes=args.density_probes,
        trace_probes=args.trace_probes,
        seed=args.seed,
        params=args.params,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        progress=False,
        resume=args.resume,
        extra={
            "batch_size": batch_size,
            "ntk_method": args.ntk_method,
            "ntk_probes": args.ntk_probes,
            "train": train,
        },
        operator_options=options,
    )
    state_path = out / TRAIN_STATE
    threshold_name = THRESHOLD_NAMES[args.optimizer]
    with tracker, torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        start = 0
        if args.resume and state_path.exists():
            start = _load_train_state(state_path, model, optimizer, train)
        elif tracker.completed_steps:
            raise CLIError(
                f"{out} has snapshots but no {TRAIN_STATE}: only runs written by curvscope "
                "track can be resumed with it"
            )
        kind = "full batch" if training.full_batch else f"batches of {args.batch_size}"
        print(
            f"curvscope track: {args.optimizer} (lr {args.lr:g}"
            + (f", momentum {args.momentum:g}" if args.optimizer != "sgd" else "")
            + f") on {training.num_samples:,} samples in {kind}, steps {start} to {args.steps}, "
            f"snapshots {schedule.spec}: {', '.join(measurements)}",
            flush=True,
        )
        snapshots = 0
        bar = tqdm(
            total=args.steps,
            initial=min(start, args.steps),
            desc="training",
            unit="step",
            disable=not _show_progress(args),
            leave=False,
        )
        with bar:
            step = start
            while True:
                if tracker.due(step):
                    # The state of step s is saved before the snapshot of s, so every committed
                    # snapshot has its state: a kill after the commit resumes after it, a kill
                    # before it takes the snapshot again (evaluate and the snapshot leave the
                    # model, the optimizer and the RNG state as they find them).
                    _save_train_state(state_path, step, model, optimizer, train)
                    model_scalars = training.evaluate(model, loss_fn)
                    snapshot = tracker.step(step, model, optimizer, **model_scalars)
                    if snapshot is not None:
                        snapshots += 1
                        bar.write(track_line(step, snapshot.scalars, threshold_name))
                if step >= args.steps:
                    break
                training.step(step, model, loss_fn, optimizer)
                step += 1
                bar.update(1)
        if start <= args.steps:
            _save_train_state(state_path, max(start, args.steps), model, optimizer, train)
    print(f"  snapshots {snapshots} taken now, {len(tracker.completed_steps)} in the run")
    print(f"  time      {time.perf_counter() - started:.1f} s")
    print(f"  plot      curvscope plot {shlex.quote(str(out))}")
    print(f"run folder: {out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .plot import plot_density_evolution, plot_sharpness, plot_traces
    from .tracking import load_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise CLIError(
            f"{str(run_dir)!r} is not a run folder (no run.json): pass the folder that "
            "curvscope track or a Tracker wrote"
        )
    out = Path(args.out) if args.out else run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder")
    run = load_run(run_dir, warn=False)
    for problem in run.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    if len(run) == 0:
        raise CLIError(f"{run_dir} holds no snapshots yet: nothing to plot")
    figures = [
        (
            "sharpness.png",
            plot_sharpness,
            "lambda_max" in run.scalars or "sharpness" in run.scalars,
        ),
        ("density_evolution.png", plot_density_evolution, len(run.densities) > 0),
        (
            "traces.png",
            plot_traces,
            any(name in run.scalars for name in ("trace", "ntk_trace", "stochastic_K")),
        ),
    ]
    written = []
    for name, plot, available in figures:
        if available:
            out.mkdir(parents=True, exist_ok=True)
            plot(run, out / name)
            written.append(out / name)
    if not written:
        raise CLIError(
            f"{run_dir} has no lambda_max, sharpness, density, trace or NTK trace to plot: "
            "track it with --measure top,density,trace (or stability, ntk)"
        )
    print(
        f"curvscope plot: {len(run)} snapshots of {run_dir} "
        f"(steps {run.steps[0]} to {run.steps[-1]})"
    )
    print(f"  wrote    {_paths(*written)}")
    return 0


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one-line :class:`CLIError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def _bounded(convert: Callable[[str], Any], noun: str, lowest: float, strict: bool):
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


_positive_int = _bounded(int, "an integer", 1, strict=False)
_nonnegative_int = _bounded(int, "an integer", 0, strict=False)
_positive_float = _bounded(float, "a number", 0.0, strict=True)


MAIN_EPILOG = """\
examples:
  curvscope density                          # built-in digits MLP: density.png in results/density
  curvscope top -k 5                         # its 5 largest Hessian eigenvalues
  curvscope trace --probes 60                # tr(H) by Hutch++
  curvscope track --out runs/gd              # train while tracking: edge of stability
  curvscope plot runs/gd                     # sharpness, density evolution, traces
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


def _common_options(
    model: str = DEFAULT_MODEL,
    data: str = DEFAULT_DATA,
    loss: str = "cross_entropy",
    out_help: str = "results folder (default: results/COMMAND)",
) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("problem (default: the built-in digits MLP)")
    group.add_argument(
        "--model",
        default=model,
        metavar="MODULE:FACTORY",
        help=f"import path of an nn.Module or a factory returning one (default: {model})",
    )
    group.add_argument(
        "--data",
        default=data,
        metavar="MODULE:FACTORY",
        help="import path of a re-iterable of (inputs, targets) batches (list, DataLoader) or "
        f"a factory returning one (default: {data})",
    )
    group.add_argument(
        "--loss",
        default=loss,
        metavar="LOSS",
        help="cross_entropy, mse (integer targets one-hot encoded), or an import path "
        f"MODULE:FN of fn(outputs, targets) -> mean loss (default: {loss})",
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
        "--seed", type=int, default=0, help="seed of probes and of the factories (default: 0)"
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: 1 for models below 100,000 trainable parameters, "
        "else the CPUs this process may use; unless OMP_NUM_THREADS is set. Idle threads "
        "sleep unless OMP_WAIT_POLICY is set)",
    )
    group.add_argument("--out", metavar="DIR", help=out_help)
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on a terminal only)"
    )
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``curvscope`` argument parser: ``density``, ``top``, ``trace``, ``track``, ``plot``."""
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
        help="keep the Lanczos basis in RAM or in a temporary file (default: memory)",
    )
    density.add_argument(
        "--checkpoint",
        action="store_true",
        help="keep the run resumable: basis and Lanczos state in OUT/checkpoint (one "
        "rank<R> folder per rank under torchrun), updated before every product (implies a "
        "disk basis); a folder that holds a checkpoint already needs --resume",
    )
    density.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in OUT/checkpoint with the same command; ends "
        "with the numbers of an uninterrupted run. Another model (spec or weights), data, "
        "loss, --params, --dtype, --iters, --probes or --seed is refused",
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

    track = commands.add_parser(
        "track",
        parents=[
            _common_options(
                model=DEFAULT_TRACK_MODEL,
                data=DEFAULT_TRACK_DATA,
                loss="mse",
                out_help="run folder (default: results/track/YYYYmmdd-HHMMSS; needed with "
                "--resume)",
            )
        ],
        formatter_class=formatter,
        help="train a model while tracking its curvature",
        allow_abbrev=False,
        description=_wrap(
            "Train a model with SGD (full batch by default), heavy-ball or Nesterov momentum, or "
            "Adam, and take curvature snapshots on a schedule with curvscope.tracking.Tracker: "
            "top eigenvalues, the sharpness against the optimizer's stability threshold "
            "(2/eta for GD, 2(1+beta)/eta for heavy ball, ...), trace, SLQ density, NTK trace and "
            "the stochastic-edge K. The default problem is the edge-of-stability setting of "
            "Cohen et al. 2021 scaled down: a 64-32-32-10 tanh MLP, MSE on one-hot targets, "
            "1,000 digits, full-batch GD. Prints one line per snapshot and the run folder at "
            "the end; read it with curvscope.tracking.load_run or draw it with 'curvscope plot'."
        ),
        epilog="examples:\n"
        "  curvscope track --steps 1000 --lr 2 --out runs/gd\n"
        "  curvscope track --batch-size 16 --measure top,stability,density,stochastic_edge\n"
        "  curvscope track --optimizer momentum --lr 0.3 --momentum 0.9 --schedule log:1:2000:20\n"
        "  curvscope track --out runs/gd --steps 2000 --resume   # continue a run to step 2000\n"
        + COMMON_EPILOG,
    )
    group = track.add_argument_group("training")
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="sgd (plain; GD with full batches), momentum (heavy ball), nesterov or adam "
        "(default: sgd)",
    )
    group.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate (default: "
        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
        + ": for sgd the edge-of-stability regime of the default problem)",
    )
    group.add_argument(
        "--momentum",
        type=float,
        help="momentum beta of momentum/nesterov, beta1 of adam (default: 0.9)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        help="samples per SGD step, drawn without replacement per epoch (default: all, full batch)",
    )
    group.add_argument(
        "--steps", type=_nonnegative_int, default=1000, help="training steps (default: 1000)"
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last saved training state up to --steps; "
        "settings not given are taken from the run, given ones must match it",
    )
    group = track.add_argument_group("tracking")
    group.add_argument(
        "--schedule",
        default="every:25",
        help="snapshot steps: every:K[:START], log:FIRST:LAST:PER_DECADE or steps:S1,S2,... "
        "(default: every:25)",
    )
    group.add_argument(
        "--measure",
        default="top,stability,trace",
        metavar="LIST",
        help="comma-separated measurements: " + ",".join(TRACK_MEASUREMENTS) + " (default: "
        "top,stability,trace)",
    )
    group.add_argument(
        "--top-k", type=_positive_int, default=1, help="eigenvalues of top (default: 1)"
    )
    group.add_argument(
        "--trace-probes",
        type=_positive_int,
        default=60,
        help="Hutch++ products of trace (default: 60)",
    )
    group.add_argument(
        "--density-iters",
        type=_positive_int,
        default=80,
        help="Lanczos steps per probe of density (default: 80)",
    )
    group.add_argument(
        "--density-probes",
        type=_positive_int,
        default=5,
        help="probes of density (default: 5)",
    )
    group.add_argument(
        "--ntk-method",
        choices=["hutchinson", "exact"],
        default="hutchinson",
        help="NTK trace estimator of ntk (default: hutchinson)",
    )
    group.add_argument(
        "--ntk-probes",
        type=_positive_int,
        default=10,
        help="Rademacher probes per batch of a hutchinson ntk (default: 10)",
    )
    track.set_defaults(
        run=run_track,
        option_strings={action.dest: action.option_strings for action in track._actions},
    )

    plot_parser = commands.add_parser(
        "plot",
        formatter_class=formatter,
        help="figures of a tracked run",
        description=_wrap(
            "Draw the figures of a run folder (curvscope track, or a Tracker in your own loop): "
            "sharpness.png (sharpness against the stability threshold, and the loss), "
            "density_evolution.png (the SLQ densities over the steps as a heat map on a log "
            "color scale) and traces.png (tr(H), tr(NTK), stochastic-edge K), whichever the "
            "run has."
        ),
        epilog="examples:\n  curvscope plot runs/gd\n  curvscope plot runs/gd --out figures\n",
    )
    plot_parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    plot_parser.add_argument(
        "--out", metavar="DIR", help="folder of the PNGs (default: RUN_DIR/plots)"
    )
    plot_parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: the CPUs this process may use, unless "
        "OMP_NUM_THREADS is set)",
    )
    plot_parser.add_argument(
        "--no-progress", action="store_true", help="accepted for symmetry; plot draws no bar"
    )
    plot_parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error"
    )
    plot_parser.set_defaults(run=run_plot)
    from . import cli_structure  # decompose, overlap, blocks; density --structure

    cli_structure.register(commands, [common])
    return parser


# --------------------------------------------------------------------------- threads

#: Variables that choose the number of threads themselves (torchrun sets OMP_NUM_THREADS=1
#: for several processes per machine): the CLI then leaves torch's choice.
THREAD_COUNT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def default_threads() -> int:
    """The number of CPUs this process may run on (its affinity mask; ``os.cpu_count()``
    where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def num_threads(args: argparse.Namespace, environ: Any = os.environ) -> int | None:
    """Threads for torch: --threads, else :func:`default_threads`, else None (torch's choice)
    when OMP_NUM_THREADS or MKL_NUM_THREADS is set."""
    if getattr(args, "threads", None):
        return int(args.threads)
    if any(environ.get(name) for name in THREAD_COUNT_ENV):
        return None
    return default_threads()


#: Below this many trainable parameters the default is one thread. With idle threads
#: sleeping (curvscope.program), every parallel region pays a wake-up, which small models'
#: tiny operations cannot earn back: digits MLPs, 1,797 samples, Hessian-vector products, 2
#: CPUs, idle machine: n = 3,466 ran 3x faster on 1 thread than on 2, n = 50k 1.3x faster;
#: n = 167k and 301k 1.2x slower (docs/benchmarks.md, Threads).
ONE_THREAD_BELOW = 100_000


def fit_threads_to_model(args: argparse.Namespace, model: nn.Module) -> None:
    """One torch thread for a model below :data:`ONE_THREAD_BELOW` trainable parameters when
    the threads are the program's default (no --threads, no OMP_NUM_THREADS); the count
    depends on the model alone, so the same command always runs the same kernels."""
    if not getattr(args, "default_threads", False):
        return
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if size < ONE_THREAD_BELOW:
        torch.set_num_threads(1)


# --------------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


USER_ERRORS = (CLIError, ValueError, TypeError, ImportError)
#: Errors that curvscope's own checks raise with a message for the user (a checkpoint that a
#: new run would overwrite, a missing or truncated result file, a basis that cannot fit in
#: memory): user errors when raised by curvscope with a message, not by the system (errno).
CHECK_ERRORS = (
    FileExistsError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    EOFError,
    MemoryError,
)


def is_user_error(error: BaseException) -> bool:
    """True for a failure the user can fix (exit status 2): :data:`USER_ERRORS`, and
    :data:`CHECK_ERRORS` raised by curvscope's own checks with a message."""
    if isinstance(error, USER_ERRORS):
        return True
    return (
        isinstance(error, CHECK_ERRORS)
        and getattr(error, "errno", None) is None
        and bool(str(error).strip())
        and bool(traceback.extract_tb(error.__traceback__))
        and not _raised_outside_curvscope(error)
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command: unwinds like Ctrl-C, so ``finally`` blocks run and
    temporary files are removed, and the command exits with status 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """The program's handling of Ctrl-C and SIGTERM while :func:`main` runs.

    While the command runs, SIGINT raises KeyboardInterrupt and SIGTERM raises
    :class:`Terminated`. An interrupt raised inside a finalizer (``__del__``), where Python
    prints "Exception ignored" and goes on, is remembered instead of printed: the command
    runs on (Python gives no way to raise it after the finalizer; a second Ctrl-C stops it)
    and ends with the interrupt's status. Once the command is over (``finish``), for the
    program the handlers stay and print one line and exit at once (results are written and
    stdout flushed: nothing is left to clean up); called from Python, the caller's handlers
    come back. Handlers are only replaced in the main thread and where they are Python's
    defaults (an ignored SIGINT, in a background job, stays ignored).
    """

    def __init__(self, program: bool) -> None:
        self.program = program
        self.finished = False
        self.pending: KeyboardInterrupt | None = None
        self.previous: dict[int, Any] = {}
        self.previous_hook = sys.unraisablehook
        if threading.current_thread() is not threading.main_thread():
            return
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self.previous[signum] = signal.signal(signum, self._handle)
        sys.unraisablehook = self._unraisable

    def _handle(self, signum: int, frame: Any) -> None:
        if self.finished:  # the program after the command: say so and stop here
            try:
                os.write(2, f"{_signal_line(signum)}\n".encode())
            finally:
                os._exit(128 + signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def _unraisable(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.pending = self.pending or unraisable.exc_value
            return
        self.previous_hook(unraisable)

    def finish(self) -> None:
        """The command is over: the program exits at the next signal; from Python, the
        caller's handlers and unraisable hook are restored."""
        if self.program:
            self.finished = True
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.previous_hook


def _signal_line(signum: int) -> str:
    if signum == signal.SIGINT:
        return f"{PROG}: interrupted"
    return f"{PROG}: terminated ({signal.Signals(signum).name})"


def interrupted(stop: KeyboardInterrupt) -> int:
    """Print the one line of an interrupted command; its exit status (130 for Ctrl-C, 143
    for SIGTERM)."""
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    print(_signal_line(signum), file=sys.stderr)
    return 128 + signum


def main(argv: Sequence[str] | None = None, *, program: bool = False) -> int:
    """Run the ``curvscope`` command with ``argv`` (default ``sys.argv[1:]``).

    torch gets --threads threads, or as many as the CPUs the process may use (unless
    OMP_NUM_THREADS or MKL_NUM_THREADS is set). The program itself (``curvscope``,
    ``python -m curvscope``: :mod:`curvscope.program`) also makes OpenMP's idle threads sleep,
    unless OMP_WAIT_POLICY is set; called from Python, this function leaves the environment
    alone.

    Ctrl-C and SIGTERM end the command in order (``finally`` blocks run, temporary files are
    removed; results already written stay) with one line on stderr and status 130 or 143.
    With ``program`` (the ``curvscope`` program), a signal that arrives after the command,
    while the interpreter shuts down, ends the process at once with the same line and status.

    Returns:
        Exit status: 0 on success, 2 for a usage or input error, 1 for any other failure,
        130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM).
    """
    signals = _Signals(program)
    try:
        try:
            code = _run_main(list(sys.argv[1:] if argv is None else argv))
            if program:  # the last output goes out while a signal still unwinds in order
                sys.stdout.flush()
                sys.stderr.flush()
        except KeyboardInterrupt as stop:  # during the error message or the flush
            code = interrupted(stop)
        if signals.pending is not None and code == 0:  # swallowed by a finalizer
            code = interrupted(signals.pending)
    finally:
        signals.finish()
    return code


def _run_main(argv: list[str]) -> int:
    debug = "--debug" in argv
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        init_from_environment()  # under torchrun/SLURM: join the process group
        threads = num_threads(args)
        if threads:
            torch.set_num_threads(threads)
        args.default_threads = threads is not None and not getattr(args, "threads", None)
        return int(args.run(args))
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt as stop:
        if debug:
            traceback.print_exc()
        return interrupted(stop)
    except Exception as error:
        if debug:
            traceback.print_exc()
        if args is not None:
            error = explain_failure(error, args) or error
        user = is_user_error(error)
        message = _one_line(error)
        if not user:
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main(program=True))
