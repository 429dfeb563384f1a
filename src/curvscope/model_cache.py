"""A disk cache of the trained built-in models and their data: repeated commands start at once.

:func:`curvscope.zoo.trained_digits_mlp` (the default problem of every ``curvscope`` command)
trains its model on first use and keeps the trained weights here; the next call, in this
process or any later one, loads them instead of training again. A cached model is the model
that training produced on this machine, bit for bit (``state_dict`` round trip). The digits
arrays (:func:`curvscope.zoo.digits_arrays`) are kept the same way, which spares each command
the import of scikit-learn.

Where (the first that applies):

* ``CURVSCOPE_NO_CACHE`` set to anything but ``""`` or ``"0"``: no cache, always train.
* ``CURVSCOPE_CACHE_DIR``: that folder; set to ``""`` it turns the cache off.
* ``$XDG_CACHE_HOME/curvscope``, else ``~/.cache/curvscope`` (no home folder: no cache).

Each entry is one file, ``<name>-<key digest>.pt``: a header line with the format and the
SHA-256 of the payload, then the payload (``torch.save`` of the key and the ``state_dict``).
The key holds the factory's arguments, the versions of curvscope and torch and the digest of
the source that trains the model, so a change of any of them trains afresh under a new name.
Files are written as every result is (:mod:`curvscope.results`: a temporary name, fsync,
rename into place), so a killed process leaves no torn entry and concurrent processes each
write a whole file. A file that fails its checksum, holds another key or does not fit the
model is reported with a warning and replaced; a folder that cannot be written is reported
with a warning and the trained model is used as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from curvscope._version import __version__
from curvscope.results import _atomic_write

ENV_DIR = "CURVSCOPE_CACHE_DIR"
ENV_OFF = "CURVSCOPE_NO_CACHE"
FORMAT = 1
_MAGIC = b"curvscope-model-cache"
_T = TypeVar("_T")
_UNWRITABLE: set[Path] = set()


def cache_dir() -> Path | None:
    """The cache folder the environment asks for, or None when the cache is off."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    configured = os.environ.get(ENV_DIR)
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "curvscope"
    try:
        return Path.home() / ".cache" / "curvscope"
    except RuntimeError:  # no home folder (e.g. a container user without one)
        return None


def source_digest(*paths: str | os.PathLike[str]) -> str:
    """SHA-256 of the given source files' bytes, to key entries by the code that trains."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def entry_key(name: str, arguments: Mapping[str, object], source: str) -> dict[str, object]:
    """Everything that decides the trained weights (JSON-able, compared on every load)."""
    return {
        "format": FORMAT,
        "name": name,
        "arguments": json.loads(json.dumps(dict(arguments), sort_keys=True)),
        "source": source,
        "curvscope": __version__,
        "torch": str(torch.__version__),
    }


def entry_path(folder: Path, key: Mapping[str, object]) -> Path:
    """``folder/<name>-<first 16 hex digits of the key's SHA-256>.pt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{key['name']}-{digest}.pt"


def cached_training(
    name: str,
    arguments: Mapping[str, object],
    source: str,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], nn.Module],
    *,
    enabled: bool = True,
) -> nn.Module:
    """``train(build())``, or ``build()`` with the weights a previous ``train`` left here.

    Args:
        name: File-name stem of the entry, e.g. ``"trained_digits_mlp"``.
        arguments: The factory's arguments (JSON-able): entries differ when they do.
        source: Digest of the code that builds and trains (:func:`source_digest`).
        build: Makes the untrained model (same architecture on every call).
        train: Trains it and returns the trained model.
        enabled: False skips the cache altogether (as ``CURVSCOPE_NO_CACHE=1`` does).

    Returns:
        The trained model, in the train/eval mode ``train`` left it in.
    """

    def restore(entry: dict) -> nn.Module:
        model = build()
        model.load_state_dict(entry["state"], strict=True)
        return model.train(bool(entry["training"]))

    def store(model: nn.Module) -> dict:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"state": state, "training": model.training}

    return _cached(name, arguments, source, lambda: train(build()), restore, store, enabled)


def cached_arrays(
    name: str,
    arguments: Mapping[str, object],
    source: str,
    compute: Callable[[], tuple[np.ndarray, ...]],
    *,
    enabled: bool = True,
) -> tuple[np.ndarray, ...]:
    """``compute()``, or the arrays a previous ``compute`` left here (bit for bit).

    For data whose preparation costs more than reading it back (the digits: importing
    scikit-learn takes ~1.4 s of a command's start).

    Args:
        name: File-name stem of the entry.
        arguments: What the arrays depend on (JSON-able).
        source: Digest of the code and data that make them.
        compute: Makes the arrays (numeric numpy arrays).
        enabled: False skips the cache altogether.

    Returns:
        The arrays, each a fresh numpy array of the dtype and shape ``compute`` gave.
    """

    def restore(entry: dict) -> tuple[np.ndarray, ...]:
        return tuple(tensor.numpy().copy() for tensor in entry["arrays"])

    def store(arrays: tuple[np.ndarray, ...]) -> dict:
        return {"arrays": [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]}

    return _cached(name, arguments, source, compute, restore, store, enabled)


def _cached(
    name: str,
    arguments: Mapping[str, object],
    source: str,
    compute: Callable[[], _T],
    restore: Callable[[dict], _T],
    store: Callable[[_T], dict],
    enabled: bool,
) -> _T:
    folder = cache_dir() if enabled else None
    if folder is None:
        return compute()
    key = entry_key(name, arguments, source)
    path = entry_path(folder, key)
    if path.exists():
        try:
            return restore(_read(path, key))
        except Exception as error:  # whatever a damaged file raises: never load, never stop
            warnings.warn(
                f"curvscope: ignoring the damaged model cache entry {path} ({error}); "
                "computing it again and replacing it",
                RuntimeWarning,
                stacklevel=3,
            )
    value = compute()
    try:
        _write(path, key, store(value))
    except OSError as error:
        if folder in _UNWRITABLE:  # said once per folder and process
            return value
        _UNWRITABLE.add(folder)
        warnings.warn(
            f"curvscope: could not write the model cache entry {path} ({error}); it is "
            f"computed again next time (set {ENV_DIR} to a writable folder, or "
            f"{ENV_OFF}=1 to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
    return value


def _write(path: Path, key: Mapping[str, object], payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"key": dict(key), **payload}, buffer)
    raw = buffer.getvalue()
    header = b"%s %d %s\n" % (_MAGIC, FORMAT, hashlib.sha256(raw).hexdigest().encode())
    _atomic_write(path, lambda file: file.write(header + raw))


def _read(path: Path, key: Mapping[str, object]) -> dict:
    raw = path.read_bytes()
    header, newline, payload = raw.partition(b"\n")
    fields = header.split(b" ")
    if not newline or len(fields) != 3 or fields[0] != _MAGIC:
        raise ValueError("not a curvscope model cache file")
    if fields[1] != b"%d" % FORMAT:
        raise ValueError(f"format {fields[1].decode(errors='replace')}, expected {FORMAT}")
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise ValueError("checksum mismatch (the file was changed or cut short)")
    entry = torch.load(io.BytesIO(payload), weights_only=True)
    if entry["key"] != dict(key):
        raise ValueError("the file holds another entry (its key differs)")
    return entry
