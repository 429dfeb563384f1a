"""Messages about the user's data: a note on the default data, an explanation of a failure.

A note when a model of the user's gets the built-in digits, and, after a failure, an explanation
when the data caused it.

:func:`remember` keeps the data a command loaded (one command at a time; :func:`forget`
clears it when the next one starts) so that :func:`explain_failure` can look at batch 0
after a failure, and only then.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..operators.batches import default_unpack, first_tensor
from .errors import PROG, CLIError, one_line, raised_outside_curvscope

#: Import paths of the built-in data that --data defaults to (density/top/..., and track).
BUILTIN_DATA = ("curvscope.zoo:digits_data", "curvscope.zoo:digits_subset")
#: The default models, which are built for that data.
BUILTIN_MODELS = ("curvscope.zoo:trained_digits_mlp", "curvscope.zoo:digits_mlp")


@dataclasses.dataclass(frozen=True)
class LoadedData:
    """The data a command loaded, and the import paths it came from."""

    data: Any
    unpack: Callable[[Any], Any] | None
    model_spec: str
    data_spec: str
    unpack_spec: str | None
    data_given: bool  # --data on the command line

    @property
    def on_default_data(self) -> bool:
        """A model of the user's (--model given) on the built-in digits, --data not given."""
        return (
            self.model_spec not in BUILTIN_MODELS
            and self.data_spec in BUILTIN_DATA
            and not self.data_given
        )


#: The data of the running command (at most one entry).
_loaded: list[LoadedData] = []


def forget() -> None:
    """A new command starts: no data is loaded yet."""
    _loaded.clear()


def remember(loaded: LoadedData) -> None:
    """Keep the loaded data for :func:`explain_failure`; note when the digits stand in for it.

    Says on stderr when a model of the user's gets the built-in digits because --data was not given.
    """
    _loaded[:] = [loaded]
    if loaded.on_default_data and not loaded.model_spec.startswith("curvscope.zoo:"):
        print(
            f"{PROG}: note: --data not given: --model {loaded.model_spec} gets the built-in "
            f"digits data {loaded.data_spec} ({describe_data(loaded.data)}); pass your model's "
            "own data with --data MODULE:FACTORY",
            file=sys.stderr,
        )


def first_batch(data: Any) -> Any:
    """The first raw batch of ``data``; raises whatever walking the data raises."""
    for batch in data:
        return batch
    raise ValueError("the data yielded no batches")


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def describe_tensors(obj: Any) -> str:
    """``float32 (256, 64)`` for a tensor, ``{'x': uint8 (16, 8)}`` for a dict, and so on."""
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).replace('torch.', '')} {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {describe_tensors(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe_tensors(v) for v in obj) + ")"
    return type(obj).__name__


def describe_data(data: Any) -> str:
    """Samples, batches and batch 0's tensors of a list of (inputs, targets) pairs.

    Example: ``1,797 samples in 8 batches; batch 0: inputs float32 (256, 64), targets int64
    (256,)``. Only for the built-in data (a list): other data is not walked for a message.
    """
    batches = list(data) if isinstance(data, (list, tuple)) else []
    if not batches or not all(_is_pair(b) for b in batches):
        return "batches of the built-in data"
    sizes = [first_tensor(b[1]) for b in batches]
    counted = ""
    if all(t is not None and t.ndim > 0 for t in sizes):
        counted = f"{sum(int(t.shape[0]) for t in sizes):,} samples in {len(batches)} batches; "
    inputs, targets = batches[0]
    return (
        f"{counted}batch 0: inputs {describe_tensors(inputs)}, targets {describe_tensors(targets)}"
    )


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


def explain_failure(error: BaseException) -> CLIError | None:
    """A command-line explanation of a failure caused by the data, or None.

    Looks at batch 0 of the data kept by :func:`remember` (after the failure only) for
    three mistakes: a batch that is not an (inputs, targets) pair without --unpack-batch,
    uint8 inputs (image bytes), and a model of the user's fed the built-in digits because
    --data was not given. The last two only explain errors raised by torch, the model or the
    loss, not by curvscope's own checks.
    """
    if not _loaded or isinstance(error, CLIError):
        return None
    loaded = _loaded[0]
    try:
        batch = first_batch(loaded.data)
    except Exception:
        return None
    failure = f"{type(error).__name__}: {one_line(error)}"
    if loaded.unpack is None and not _is_pair(batch):
        if isinstance(error, ValueError) and "unpack_batch" in str(error):
            size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            return CLIError(
                f"--data {loaded.data_spec}: a batch is a {type(batch).__name__}{size}, not an "
                "(inputs, targets) pair: pass --unpack-batch MODULE:FN, a function fn(batch) "
                "-> (inputs, targets) (inputs may be a tensor, a tuple of positional inputs or "
                "a dict of keyword inputs)"
            )
        return None
    if not raised_outside_curvscope(error):
        return None
    try:
        inputs, _ = (loaded.unpack or default_unpack)(batch)
    except Exception:
        return None
    found = _uint8_tensors(inputs)
    if found:
        name, tensor = found[0]
        place = f"the data factory (--data {loaded.data_spec})"
        if loaded.unpack_spec:
            place += f" or in --unpack-batch {loaded.unpack_spec}"
        return CLIError(
            f"the model failed on uint8 inputs (batch 0's {name} are uint8 of shape "
            f"{tuple(tensor.shape)}): {failure}. Convert the inputs to floating point in "
            f"{place}, e.g. x.float() / 255 for 0-255 pixel values"
        )
    if loaded.on_default_data:
        return CLIError(
            f"--model {loaded.model_spec} failed on the built-in digits data that --data "
            f"defaults to ({loaded.data_spec}: {describe_data(loaded.data)}): {failure}. Pass "
            "your model's own data with --data MODULE:FACTORY"
        )
    return None
