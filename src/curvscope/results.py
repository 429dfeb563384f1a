"""Saving and loading small result objects: arrays in ``.npz``, metadata in ``.json``.

The ``.json`` of a result class also carries a ``summary`` object: the numbers a reader of the
``.json`` alone wants (eigenvalues and residuals, a density's extreme Ritz values and negative
mass, ...), copied from the arrays when the result is saved. The ``.npz`` stays the source of
the arrays: ``load`` skips ``summary`` (files written before it existed load as before).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__


def environment_metadata() -> dict[str, str]:
    """Versions that a reader of a saved result needs to judge it."""
    import scipy
    import torch

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
    """Inverse of :func:`save_result`: (arrays by name, metadata).

    Raises:
        FileNotFoundError: ``path.npz`` or ``path.json`` is missing.
        ValueError: A file is damaged or not what :func:`save_result` writes (not a readable
            ``.npz`` archive of plain arrays, or not a JSON object); the message names the file.
    """
    npz_path, json_path = result_paths(path)
    for file in (npz_path, json_path):
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: was the result saved there?")
    try:
        data = np.load(npz_path, allow_pickle=False)
    except (PermissionError, IsADirectoryError):
        raise
    except _READ_ERRORS as error:
        raise ValueError(
            f"{npz_path}: not a readable .npz file ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{npz_path}: a single .npy array, not an .npz archive of named arrays: "
            "save results with save_result (or the result's save)"
        )
    with data:
        arrays = {}
        for key in data.files:
            try:
                arrays[key] = data[key]
            except _READ_ERRORS as error:
                raise ValueError(
                    f"{npz_path}: array {key!r} is not readable ({type(error).__name__}: {error})"
                ) from error
            if not isinstance(arrays[key], np.ndarray):  # a zip member that is no .npy
                raise ValueError(
                    f"{npz_path}: member {key!r} is not a .npy array: the file was not written "
                    "by save_result"
                )
    try:
        meta = json.loads(json_path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{json_path}: not valid JSON ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(meta, dict):
        raise ValueError(
            f"{json_path}: must hold a JSON object of metadata, got a {type(meta).__name__}"
        )
    return arrays, meta


#: What reading a damaged or crafted ``.npz`` raises inside numpy and zipfile.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError)

#: dtype kinds accepted for each kind of array field, and how an error names them.
_DTYPES = {
    "float": ("fiu", "real numbers"),
    "int": ("iu", "integers"),
    "bool": ("b", "booleans (dtype bool)"),
}


class ResultFile:
    """A saved result's arrays and metadata with checked access, for the result classes' ``load``.

    Every accessor raises a ValueError that names the file and the field and says what was
    expected. Metadata fields are taken out of :attr:`meta` as they are read, so what is left
    afterwards is the result's free-form metadata. The ``summary`` field (numbers copied from
    the arrays for readers of the ``.json``) is checked to be an object and left out: the
    arrays are read from the ``.npz``.

    Args:
        path: ``x``, ``x.npz`` or ``x.json`` as for :func:`load_result`.
        kind: The ``kind`` the class's ``save`` writes; a file of another kind is refused (a
            file without ``kind`` is accepted).
        writer: The method that writes such files, for the messages (``"Eigenpairs.save"``).

    Attributes:
        arrays: The ``.npz`` arrays by name.
        meta: The metadata not read yet (``kind`` already removed).
        npz_path, json_path: The two files.
    """

    def __init__(self, path: str | os.PathLike[str], kind: str, writer: str) -> None:
        self.npz_path, self.json_path = result_paths(path)
        self.arrays, self.meta = load_result(path)
        self.writer = writer
        summary = self.meta.pop("summary", {})
        if not isinstance(summary, dict):
            raise ValueError(
                f"{self.json_path}: field 'summary' must be a JSON object, got {summary!r}"
            )
        found = self.meta.pop("kind", kind)
        if found != kind:
            raise ValueError(
                f"{self.json_path}: field 'kind' is {found!r}, not {kind!r}: the file holds "
                f"another result than {writer} writes; load it with its own class"
            )

    # -- arrays ------------------------------------------------------------------------------

    def array(
        self,
        name: str,
        dtype: str = "float",
        shape: tuple[int | None, ...] | None = None,
        like: str = "",
        nan: bool = True,
        inf: bool = True,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> np.ndarray:
        """Array ``name``, checked.

        Args:
            name: Array name in the ``.npz``.
            dtype: "float" (any real dtype), "int" or "bool".
            shape: Expected shape; None entries match any length.
            like: Where the expected shape comes from, for the message ("as 'nodes'").
            nan: Whether NaN entries are allowed (float arrays).
            inf: Whether infinite entries are allowed (float arrays).
            minimum: Smallest allowed entry (NaN entries are governed by ``nan``).
            maximum: Largest allowed entry.
        """
        if name not in self.arrays:
            found = ", ".join(sorted(self.arrays)) or "none"
            raise ValueError(
                f"{self.npz_path}: missing array {name!r} (found: {found}): was the file "
                f"written by {self.writer}?"
            )
        value = self.arrays[name]
        kinds, words = _DTYPES[dtype]
        if value.dtype.kind not in kinds:
            raise ValueError(f"{self.npz_path}: {name} must hold {words}, got dtype {value.dtype}")
        if shape is not None and (
            value.ndim != len(shape)
            or any(
                want is not None and got != want
                for got, want in zip(value.shape, shape, strict=True)
            )
        ):
            wanted = "(" + ", ".join("any" if w is None else str(w) for w in shape)
            wanted += ",)" if len(shape) == 1 else ")"
            raise ValueError(
                f"{self.npz_path}: {name} has shape {value.shape}, expected {wanted}"
                + (f" {like}" if like else "")
            )
        if value.dtype.kind == "f":
            if not nan and np.isnan(value).any():
                raise ValueError(f"{self.npz_path}: {name} has NaN entries")
            if not inf and np.isinf(value).any():
                raise ValueError(f"{self.npz_path}: {name} has infinite entries")
        if value.dtype.kind != "b" and value.size:
            with np.errstate(invalid="ignore"):
                if minimum is not None and (value < minimum).any():
                    raise ValueError(
                        f"{self.npz_path}: {name} has entries below {minimum} "
                        f"(smallest {np.nanmin(value)})"
                    )
                if maximum is not None and (value > maximum).any():
                    raise ValueError(
                        f"{self.npz_path}: {name} has entries above {maximum} "
                        f"(largest {np.nanmax(value)})"
                    )
        return value

    # -- metadata fields ---------------------------------------------------------------------

    def _field(self, name: str) -> Any:
        if name not in self.meta:
            raise ValueError(
                f"{self.json_path}: missing field {name!r}: was the file written by {self.writer}?"
            )
        return self.meta.pop(name)

    def integer(self, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
        """Integer field ``name`` (not a bool, not a float) within the bounds."""
        value = self._field(name)
        if minimum == 1 and maximum is None:
            what = "a positive integer"
        elif minimum is not None and maximum is None:
            what = f"an integer >= {minimum}"
        elif minimum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        else:
            what = "an integer"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            raise ValueError(f"{self.json_path}: field {name!r} must be {what}, got {value!r}")
        return value

    def number(
        self, name: str, nan: bool = True, inf: bool = True, minimum: float | None = None
    ) -> float:
        """Number field ``name`` as a float (JSON ``NaN``/``Infinity`` read as such)."""
        value = self._field(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.json_path}: field {name!r} must be a number, got {value!r}")
        value = float(value)
        if not nan and math.isnan(value):
            raise ValueError(f"{self.json_path}: field {name!r} is NaN")
        if not inf and math.isinf(value):
            raise ValueError(f"{self.json_path}: field {name!r} is infinite ({value})")
        if minimum is not None and value < minimum:
            raise ValueError(
                f"{self.json_path}: field {name!r} must be >= {minimum}, got {value!r}"
            )
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        """JSON-object field ``name`` as a dict."""
        value = self._field(name)
        if not isinstance(value, dict):
            raise ValueError(
                f"{self.json_path}: field {name!r} must be a JSON object, got {value!r}"
            )
        return value

    def boolean(self, name: str) -> bool:
        """Boolean field ``name`` (JSON true or false, not 0 or 1)."""
        value = self._field(name)
        if not isinstance(value, bool):
            raise ValueError(
                f"{self.json_path}: field {name!r} must be true or false, got {value!r}"
            )
        return value

    def check_optional(self, name: str, read: Callable[[str], Any]) -> None:
        """Check free-form metadata field ``name`` with ``read`` when it is present.

        ``read`` is ``self.boolean``, ...; the field stays in :attr:`meta`.
        """
        if name in self.meta:
            kept = dict(self.meta)
            read(name)
            self.meta.clear()
            self.meta.update(kept)  # in place and in order


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
