"""Saving and loading small result objects: arrays in ``.npz``, metadata in ``.json``."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def environment_metadata() -> dict[str, str]:
    """Versions that a reader of a saved result needs to judge it."""
    import scipy
    import torch

    from . import __version__

    return {
        "curvscope_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "scipy_version": scipy.__version__,
        "python_version": platform.python_version(),
    }


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``x`` or ``x.npz`` or ``x.json`` -> (``x.npz``, ``x.json``)."""
    base = Path(path)
    if base.suffix in (".npz", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def save_result(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Save ``arrays`` to ``path.npz`` and ``meta`` to ``path.json`` atomically."""
    npz_path, json_path = result_paths(path)
    _atomic_write(npz_path, lambda h: np.savez(h, **arrays))
    text = json.dumps(meta, indent=2, sort_keys=True, default=_jsonable)
    _atomic_write(json_path, lambda h: h.write(text.encode()))
    return npz_path, json_path


def load_result(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`save_result`."""
    npz_path, json_path = result_paths(path)
    for file in (npz_path, json_path):
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: was the result saved there?")
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(json_path.read_text())
    return arrays, meta


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
