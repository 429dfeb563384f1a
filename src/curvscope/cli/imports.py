"""Import paths ``package.module:name`` of the model, the data, the loss and the unpack hook.

Also ``path/to/file.py:name``; resolved as uvicorn and Lightning resolve theirs.

Every mistake (a missing module, attribute or file, a factory that fails, an object of the
wrong kind) is a :class:`~curvscope.cli.errors.CLIError` that says what is wrong and how to
fix it. A file named by several options runs once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..losses import LOSSES
from .errors import CLIError, one_line


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
                f"{option} {spec!r}: getting {part!r} from {owner} failed: {one_line(error)}"
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
    """True when ``obj.name`` was defined in module ``owner``.

    False when reading it fails: the hint of an error message must not raise.
    """
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
            f"{option} {spec!r}: importing {module_name} failed: {one_line(error)}"
        ) from error
    except Exception as error:
        raise CLIError(
            f"{option} {spec!r}: importing {module_name} failed: {one_line(error)}"
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
        raise CLIError(f"{option} {spec!r}: running {path} failed: {one_line(error)}") from error
    _FILE_MODULES[resolved] = module
    return module


def _loaded_as_file(module_name: str) -> ModuleType | None:
    """The module a ``path/to/file.py`` import path loaded, when ``module_name`` is that file.

    Importing ``module_name`` would run that same file again (``--model mymodels.py:build --data
    mymodels:batches``).
    """
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
    """A module already imported from the file ``path``, or None.

    As with ``--data mymodels:batches`` before ``--model mymodels.py:build``.
    """
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
        raise CLIError(f"{option} {spec!r}: calling it failed: {one_line(error)}") from error


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
