"""An append-only, crash-safe run folder, and :func:`load_run` to read it back as arrays.

Layout of a run folder::

    run.json                      format, config, versions; written once, atomically
    run.lock                      held (flock) by the one writer while it is open
    scalars.jsonl                 index: one JSON line per snapshot, appended as committed
    snapshots/
        step_00000120/            one folder per snapshot, renamed into place complete
            scalars.json          {"step": 120, "lambda_max": ..., ...}
            density.npz, .json    one pair per measurement result (its own ``save``)
            top.npz, .json
            trace.npz, .json
            manifest.json         written last: every file above with its size and sha256
        .tmp-step_00000130-PID-RANDOM/   a snapshot being written (or a killed writer's)

Why a SIGKILL at any moment leaves every earlier snapshot readable:

1. A snapshot is written completely inside a temporary folder: every file is written, flushed
   and fsync'ed, the manifest last, then the folder itself is fsync'ed.
2. The folder is then renamed to ``step_XXXXXXXX`` with one ``os.replace``. rename(2) of a
   directory is atomic on POSIX file systems: a reader sees either no ``step_`` folder or the
   complete one, never a part. This rename is the commit point; the snapshots folder is fsync'ed
   after it so the commit also survives a power cut.
3. Only then is the snapshot's line appended to ``scalars.jsonl`` with a single ``write`` on an
   ``O_APPEND`` descriptor, then fsync. The index is a convenience (``tail -f``, pandas'
   ``read_json(lines=True)``); the snapshot folders are the truth. A killed writer can leave a
   temporary folder (reported, then removed on resume), a committed snapshot whose index line
   is missing (reported; read from its own ``scalars.json``; the line is re-appended on resume),
   or, in principle, a torn last line (reported with its line number; on resume a newline ends
   it so that later lines stay whole).

Nothing is ever silently dropped: :func:`load_run` lists every bad, partial or unexpected file
in ``Run.problems`` with its path and the reason, and warns once when there are any. It checks
every snapshot file against the size and sha256 in its manifest (a file changed in place, even
to the same size, leaves its snapshot out), and an index line that disagrees with its snapshot's
``scalars.json``. A resume makes the same content checks and moves a damaged snapshot aside so
that its step is measured again.

Results load with their own class's ``load`` only for the classes of :func:`result_classes`;
any other type name in a manifest loads as plain ``(arrays, meta)``: nothing named in a run
folder is imported or called. The loaders check what they read (shapes, dtypes, signs, counts)
and raise a ValueError naming the file and the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..results import _atomic_write, _jsonable, environment_metadata, load_result, save_result

FORMAT = "curvscope-run"
FORMAT_VERSION = 1
RUN_FILE = "run.json"
INDEX_FILE = "scalars.jsonl"
LOCK_FILE = "run.lock"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"
SCALARS_FILE = "scalars.json"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = ".damaged-"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d+)-(\d+)-[0-9a-f]+$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class RunProblem:
    """A bad, partial or unexpected file in a run folder: an entry of ``Run.problems``.

    Named for the run folder, not for the learning problem (model, data and loss) that
    :mod:`curvscope.zoo` and the CLI's ``--model``/``--data`` options call a problem.
    ``Problem`` is the same class under its former name.

    Attributes:
        path: The file or folder.
        reason: What is wrong and what it means for the series.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: Former name of :class:`RunProblem`, kept for code that imported it.
Problem = RunProblem


def step_dirname(step: int) -> str:
    """Name of the snapshot folder of ``step``: ``step_00000042``."""
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------
# Low-level durable writes


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def _append_line(path: Path, obj: Any) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(obj, sort_keys=True, default=_jsonable) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # a short write on a regular file is rare but allowed
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise(obj: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, numpy scalars -> numbers)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def _as_scalar(name: str, value: Any) -> float | int | bool:
    """A finite-or-not number from a Python, numpy or 0-d torch value; None -> NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 1)() == 1:
        return item()
    raise TypeError(
        f"scalar {name!r} is a {type(value).__name__}: snapshot scalars must be numbers "
        "(int, float, bool, a numpy scalar or a one-element tensor)"
    )


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------
# Writer


class RunStore:
    """Writer of one run folder (see the module docstring for the layout and its guarantees).

    Args:
        path: The run folder; created when missing.
        config: JSON-able settings of the run (measurements, schedule, seeds, user extras),
            written once into ``run.json``. On resume it must equal the stored config, so a
            series never mixes settings; ``None`` on resume accepts the stored config.
        resume: False: the folder must not hold a run with a committed snapshot yet; a run
            whose writer stopped before its first commit (``run.json``, an empty index and at
            most temporary snapshot folders) holds no data, so it is replaced (and reported in
            :attr:`problems`). True: continue the run there (or start one when there is none):
            completed snapshots are kept and listed in :attr:`completed_steps`, a killed
            writer's temporary folders are reported in :attr:`problems` and removed, a torn
            last index line is ended with a newline, and index lines missing for committed
            snapshots are appended again.
        lock: Hold an exclusive lock on ``run.lock`` while open, so two writers never
            interleave in one folder (released by the OS if the process dies).

    Attributes:
        completed_steps: Steps whose snapshot is committed, as a set.
        problems: What resume found and repaired, as :class:`RunProblem` entries.
        config: The run's config as stored.
        last_identity: The ``identity`` stored with the latest committed snapshot (see
            :meth:`write_snapshot`); None for a new run or one written without identities.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
        lock: bool = True,
    ) -> None:
        self.path = Path(path)
        self.snapshots_dir = self.path / SNAPSHOTS
        self.index_path = self.path / INDEX_FILE
        self.problems: list[RunProblem] = []
        self.last_identity: dict[str, Any] | None = None
        self._lock_handle: Any = None
        self._closed = False
        run_file = self.path / RUN_FILE
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path} is a file: a run store needs a folder")
        # A run.json without any committed snapshot (its writer stopped before the first
        # commit) holds no data: a fresh run replaces it instead of being refused.
        replace_empty = run_file.exists() and not resume and self._holds_no_snapshot()
        if run_file.exists() and not resume and not replace_empty:
            raise FileExistsError(
                f"{self.path} already holds a run with committed snapshots: pass resume=True to "
                "continue it, or choose a new folder"
            )
        if not run_file.exists() and self.path.exists() and any(self.path.iterdir()):
            raise FileExistsError(
                f"{self.path} is not empty and holds no {RUN_FILE}: choose an empty or new folder "
                "for the run"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.snapshots_dir.mkdir(exist_ok=True)
        if lock:
            self._acquire_lock()
        try:
            if replace_empty:
                self._clear_empty_run()
            if run_file.exists():
                self.config = self._check_config(run_file, config)
                self._recover()
            else:
                self.config = _normalise(dict(config or {}))
                meta = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "created_unix": time.time(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "config": self.config,
                    **environment_metadata(),
                }
                _write_json_atomic(run_file, meta)
                _fsync_dir(self.path)
                self.completed_steps: set[int] = set()
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------

    def _holds_no_snapshot(self) -> bool:
        """True when the folder holds only a run's skeleton.

        That is ``run.json``, the lock, an empty (or no) index and no snapshot folder but a killed
        writer's temporary ones.

        Damaged or set-aside snapshot folders, index lines and any other file count as data,
        so such a folder is still refused without ``resume=True``.
        """
        known = {RUN_FILE, LOCK_FILE, INDEX_FILE, SNAPSHOTS}
        if any(entry.name not in known for entry in self.path.iterdir()):
            return False
        if self.index_path.exists() and self.index_path.stat().st_size > 0:
            return False
        if self.snapshots_dir.exists():
            if not self.snapshots_dir.is_dir():
                return False
            for entry in self.snapshots_dir.iterdir():
                if not (entry.name.startswith(TMP_PREFIX) and entry.is_dir()):
                    return False
        return True

    def _clear_empty_run(self) -> None:
        """Remove a run that never committed a snapshot (under the lock), so a new one starts.

        Checked again under the lock: a writer that committed in between makes it a run again.
        """
        if not self._holds_no_snapshot():
            raise FileExistsError(
                f"{self.path} received a snapshot while this store was opening: pass "
                "resume=True to continue it, or choose a new folder"
            )
        for entry in sorted(self.snapshots_dir.iterdir()):
            shutil.rmtree(entry, ignore_errors=True)
        self.index_path.unlink(missing_ok=True)
        (self.path / RUN_FILE).unlink()
        _fsync_dir(self.path)
        self.problems.append(
            RunProblem(
                str(self.path / RUN_FILE),
                "a run that never committed a snapshot (its writer stopped before the first "
                "one); replaced by this new run",
            )
        )

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one writer per folder is on the user
            return
        handle = open(self.path / LOCK_FILE, "a+b")  # noqa: SIM115 - held while the store is open
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RuntimeError(
                f"another writer holds {self.path / LOCK_FILE}: a tracker or RunStore on this "
                "run is still open (in this process call its close(), or wait for the other "
                "process to finish)"
            ) from None
        self._lock_handle = handle

    def _check_config(self, run_file: Path, config: Mapping[str, Any] | None) -> dict[str, Any]:
        meta = json.loads(run_file.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{run_file} is not a curvscope run of format version {FORMAT_VERSION} "
                f"(found {meta.get('format')!r} version {meta.get('format_version')!r})"
            )
        stored = meta.get("config", {})
        if config is None:
            return stored
        wanted = _normalise(dict(config))
        if wanted != stored:
            keys = sorted(
                key for key in set(wanted) | set(stored) if wanted.get(key) != stored.get(key)
            )
            details = "; ".join(
                f"{key}: stored {stored.get(key)!r}, now {wanted.get(key)!r}" for key in keys
            )
            raise ValueError(
                f"cannot resume {self.path}: the settings differ from the stored run ({details}). "
                "Resume with the same settings, or start a new run folder"
            )
        return stored

    def _recover(self) -> None:
        """Resume: clean a killed writer's leftovers and bring the index up to date."""
        for entry in sorted(self.snapshots_dir.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                self.problems.append(
                    RunProblem(
                        str(entry),
                        "a snapshot write that never completed (writer stopped before the "
                        "rename); removed",
                    )
                )
                shutil.rmtree(entry, ignore_errors=True)
        # Content checks too: a snapshot corrupted in place (same size) is moved aside and its
        # step redone, never continued from.
        report = scan_snapshots(self.snapshots_dir, check_hashes=True)
        self.problems.extend(report.problems)
        for step, folder in report.damaged.items():
            aside = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{secrets.token_hex(4)}")
            os.replace(folder, aside)
            self.problems.append(
                RunProblem(str(aside), f"damaged snapshot of step {step} moved aside; step redone")
            )
        self.completed_steps = set(report.valid)
        if report.valid:
            identity = report.manifests[max(report.valid)].get("identity")
            self.last_identity = identity if isinstance(identity, dict) else None
        lines, line_problems, torn_tail = read_index(self.index_path)
        self.problems.extend(line_problems)
        if torn_tail:
            with open(self.index_path, "ab") as handle:
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        indexed = {row["step"] for _, row in lines}
        for step in sorted(self.completed_steps - indexed):
            _append_line(self.index_path, report.rows[step])
            self.problems.append(
                RunProblem(
                    str(report.valid[step]),
                    f"step {step} was committed but missing from {INDEX_FILE}; line appended",
                )
            )

    # -- writing ---------------------------------------------------------------------------

    def write_snapshot(
        self,
        step: int,
        scalars: Mapping[str, Any],
        results: Mapping[str, Any] | None = None,
        notes: Mapping[str, Mapping[str, Any]] | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> Path:
        """Commit one snapshot atomically.

        Args:
            step: Training step (>= 0) not yet in the run.
            scalars: Numbers by name (step is added; a name may not be "step").
            results: Result objects by name; each is written with its own ``save(path)``
                (``SpectralDensity``, ``Eigenpairs``, ``TraceEstimate``) or, for a mapping of
                numpy arrays, with :func:`curvscope.results.save_result` as ``name.npz``.
            notes: JSON-able notes by measurement name, kept in the snapshot's manifest and
                read back as :attr:`Run.notes`; the Tracker stores ``{"status": "skipped" |
                "failed", "reason": "..."}`` for a measurement that recorded nothing.
            identity: JSON-able description of what was measured, kept in the snapshot's
                manifest as "identity"; the latest committed one is :attr:`last_identity`
                after a resume (the Tracker stores its loss, data, parameters and dtype there
                and refuses to resume with others).

        Returns:
            The committed snapshot folder.
        """
        if self._closed:
            raise RuntimeError(f"the run store of {self.path} is closed")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        if step in self.completed_steps:
            raise ValueError(
                f"step {step} already has a snapshot in {self.path}: the store is append-only"
            )
        if "step" in scalars:
            raise ValueError("'step' is set by the store: remove it from the scalars")
        row = {"step": step, **{name: _as_scalar(name, v) for name, v in scalars.items()}}
        results = dict(results or {})
        notes = _normalise(dict(notes or {}))
        identity = _normalise(dict(identity)) if identity is not None else None
        for name in results:
            if not _NAME.match(name) or name in ("scalars", "manifest"):
                raise ValueError(
                    f"result name {name!r} is not a valid file stem (letters, digits, _ . -; "
                    "not 'scalars' or 'manifest')"
                )
        final = self.snapshots_dir / step_dirname(step)
        tmp = self.snapshots_dir / (
            f"{TMP_PREFIX}{step_dirname(step)}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        tmp.mkdir()
        try:
            entries = {}
            for name, result in results.items():
                entries[name] = {"type": _save_result(tmp / name, result)}
            _write_json_atomic(tmp / SCALARS_FILE, row)
            files = {
                file.name: {"size": file.stat().st_size, "sha256": _sha256(file)}
                for file in sorted(tmp.iterdir())
            }
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": step,
                "written_unix": time.time(),
                "results": entries,
                "files": files,
            }
            if notes:
                manifest["notes"] = notes
            if identity is not None:
                manifest["identity"] = identity
            _write_json_atomic(tmp / MANIFEST, manifest)
            _fsync_dir(tmp)
            os.replace(tmp, final)  # the commit point: atomic rename of the whole folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.snapshots_dir)
        if identity is not None and step >= max(self.completed_steps, default=step):
            self.last_identity = identity
        self.completed_steps.add(step)
        _append_line(self.index_path, row)
        return final

    def close(self) -> None:
        """Release the writer's lock; the folder is complete after every write already."""
        self._closed = True
        if self._lock_handle is not None:
            with contextlib.suppress(OSError):
                self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _save_result(base: Path, result: Any) -> str:
    """Write ``result`` as ``base.npz`` + ``base.json``; return its type name for the loader."""
    if hasattr(result, "save"):
        result.save(base)
        return _type_name(result)
    if isinstance(result, Mapping):
        arrays = {key: np.asarray(value) for key, value in result.items()}
        save_result(base, arrays, {"kind": "arrays"})
        return "arrays"
    raise TypeError(
        f"result {base.name!r} is a {type(result).__name__}: a snapshot result must have "
        "save(path) (SpectralDensity, Eigenpairs, TraceEstimate, ...) or be a dict of arrays"
    )


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Scan:
    valid: dict[int, Path] = field(default_factory=dict)
    manifests: dict[int, dict[str, Any]] = field(default_factory=dict)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    damaged: dict[int, Path] = field(default_factory=dict)
    problems: list[RunProblem] = field(default_factory=list)


def scan_snapshots(snapshots_dir: Path, check_hashes: bool = True) -> _Scan:
    """Committed snapshots whose manifest and files check out; everything else as problems.

    ``check_hashes`` compares every listed file with its sha256 in the manifest (reads every
    byte); False checks sizes only, which misses a corruption that keeps the size.
    """
    scan = _Scan()
    if not snapshots_dir.is_dir():
        scan.problems.append(RunProblem(str(snapshots_dir), "missing: the run has no snapshots"))
        return scan
    for entry in sorted(snapshots_dir.iterdir()):
        match = _STEP_DIR.match(entry.name)
        if entry.name.startswith(TMP_PREFIX):
            tmp = _TMP_DIR.match(entry.name)
            what = f"step {int(tmp.group(1))} by pid {tmp.group(2)}" if tmp else "a snapshot"
            scan.problems.append(
                RunProblem(
                    str(entry),
                    f"temporary folder of {what}: a write in progress or one whose writer "
                    "was killed; not part of the series (resume removes it)",
                )
            )
            continue
        if entry.name.startswith(DAMAGED_PREFIX):
            scan.problems.append(
                RunProblem(
                    str(entry), "a damaged snapshot that a resume moved aside; not in the series"
                )
            )
            continue
        if match is None or not entry.is_dir():
            scan.problems.append(RunProblem(str(entry), "unexpected entry in snapshots/; ignored"))
            continue
        step = int(match.group(1))
        try:
            scan.manifests[step], scan.rows[step] = _check_snapshot(entry, step, check_hashes)
        except _DamagedError as error:
            scan.problems.append(RunProblem(str(entry), f"{error}; step {step} left out"))
            scan.damaged[step] = entry
            continue
        scan.valid[step] = entry
    return scan


class _DamagedError(Exception):
    pass


def _check_snapshot(
    folder: Path, step: int, check_hashes: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, scalars row) of a committed snapshot, or :class:`_DamagedError` saying why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise _DamagedError(f"no {MANIFEST} (not written by a RunStore, or damaged)") from None
    except (OSError, ValueError) as error:
        raise _DamagedError(f"unreadable {MANIFEST} ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("step") != step:
        found = manifest.get("step") if isinstance(manifest, dict) else None
        raise _DamagedError(f"{MANIFEST} says step {found!r}, the folder name says {step}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or SCALARS_FILE not in files:
        raise _DamagedError(f"{MANIFEST} does not list {SCALARS_FILE}")
    _check_manifest_entries(manifest)
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise _DamagedError(f"{name} listed in the manifest is missing")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise _DamagedError(
                f"{name} has {size} bytes, the manifest says {expected.get('size')}"
            )
        if check_hashes and _sha256(file) != expected.get("sha256"):
            raise _DamagedError(
                f"{name} does not match its sha256 in the manifest (corrupted in place: same "
                "size, other content)"
            )
    try:
        row = json.loads((folder / SCALARS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise _DamagedError(f"unreadable {SCALARS_FILE} ({error})") from None
    if not isinstance(row, dict) or row.get("step") != step:
        raise _DamagedError(f"{SCALARS_FILE} does not hold step {step}")
    return manifest, row


def _check_manifest_entries(manifest: dict[str, Any]) -> None:
    """The manifest's file, result and note entries have the shapes a RunStore writes.

    Names are plain file names inside the snapshot folder (no path can lead out of it).
    """
    for name, expected in manifest["files"].items():
        if not _NAME.match(name) or name == MANIFEST:
            raise _DamagedError(f"{MANIFEST} lists {name!r}, not a file name of a snapshot")
        if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str):
            raise _DamagedError(f"{MANIFEST} entry of {name} is not {{size, sha256}}")
    results = manifest.get("results", {})
    if not isinstance(results, dict):
        raise _DamagedError(f"{MANIFEST} field 'results' is not an object")
    for name, entry in results.items():
        if not _NAME.match(name) or name in ("scalars", "manifest"):
            raise _DamagedError(f"{MANIFEST} names a result {name!r}, not a valid file stem")
        if not isinstance(entry, dict) or not isinstance(entry.get("type", "arrays"), str):
            raise _DamagedError(f"{MANIFEST} entry of result {name!r} has no type name")
    if not isinstance(manifest.get("notes", {}), dict):
        raise _DamagedError(f"{MANIFEST} field 'notes' is not an object")


def read_index(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[RunProblem], bool]:
    """Parse ``scalars.jsonl``: ((line number, row) pairs, problems, last line torn?)."""
    if not path.exists():
        return [], [], False
    data = path.read_bytes()
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[RunProblem] = []
    torn_tail = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")
    if not torn_tail:
        lines = lines[:-1]  # the empty string after the final newline
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        try:
            row = json.loads(raw.decode())
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except (UnicodeDecodeError, ValueError) as error:
            if is_last and torn_tail:
                why = "torn last line (no newline: the writer stopped mid-write)"
            elif not raw.strip():
                why = "empty line"
            else:
                why = "invalid line (a torn line ended by a resume, or damage)"
            preview = raw[:60].decode(errors="replace")
            problems.append(RunProblem(f"{path}:{number}", f"{why}: {error}; text {preview!r}"))
            continue
        rows.append((number, row))
    return rows, problems, torn_tail


class ResultSeries(Mapping[int, Any]):
    """Lazy ``step -> result`` mapping over the snapshots holding one measurement's result.

    Loading happens on access (``run.densities[120]``) and is cached; iteration is in step
    order. A result whose type is not one of :func:`result_classes` loads as
    ``(arrays, meta)`` (the type name is never imported).
    """

    def __init__(self, run: Run, name: str) -> None:
        self._run = run
        self._name = name
        self._steps = [
            int(step) for step in run.steps if name in run._manifests[int(step)].get("results", {})
        ]
        self._cache: dict[int, Any] = {}

    def __getitem__(self, step: int) -> Any:
        step = int(step)
        if step not in self._cache:
            if step not in self._steps:
                raise KeyError(f"no {self._name!r} result at step {step}")
            self._cache[step] = self._run.load(step, self._name)
        return self._cache[step]

    def __iter__(self) -> Iterator[int]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"ResultSeries({self._name!r}, steps={self._steps})"


class Run:
    """A run folder read back: the scalar series as arrays aligned with ``steps``.

    Attributes:
        path: The run folder.
        config: The run's settings from ``run.json``; ``meta`` holds all of ``run.json``.
        steps: Committed, readable snapshot steps, sorted, shape (S,), int64.
        scalars: name -> float64 array of shape (S,), NaN where a snapshot lacks the name.
        notes: step -> {measurement name: note} for the snapshots that carry notes; a
            Tracker's note is ``{"status": "skipped" | "failed", "reason": "..."}`` for a
            measurement that recorded nothing at that step (its scalars are NaN there).
        problems: Every bad, partial or unexpected file, as :class:`RunProblem` (path,
            reason).
    """

    def __init__(self, path: Path, meta: dict[str, Any], scan: _Scan, problems: list[RunProblem]):
        self.path = path
        self.meta = meta
        self.config = meta.get("config", {})
        self.problems = problems
        self._dirs = scan.valid
        self._manifests = scan.manifests
        self.steps = np.array(sorted(scan.valid), dtype=np.int64)
        self._rows = [scan.rows[int(step)] for step in self.steps]
        names: list[str] = []
        for row in self._rows:
            names.extend(name for name in row if name != "step" and name not in names)
        self.scalars = {
            name: np.array([_float(row.get(name)) for row in self._rows], dtype=np.float64)
            for name in names
        }
        self.notes: dict[int, dict[str, Any]] = {
            int(step): dict(self._manifests[int(step)]["notes"])
            for step in self.steps
            if self._manifests[int(step)].get("notes")
        }

    @property
    def result_names(self) -> list[str]:
        """Names of the measurement results found in any snapshot."""
        names: list[str] = []
        for step in self.steps:
            names.extend(n for n in self._manifests[int(step)].get("results", {}) if n not in names)
        return names

    def results(self, name: str) -> ResultSeries:
        """Lazy ``step -> result`` mapping for one measurement's result files."""
        return ResultSeries(self, name)

    @property
    def densities(self) -> ResultSeries:
        """step -> :class:`~curvscope.linalg.SpectralDensity` (loaded on access)."""
        return self.results("density")

    @property
    def eigenpairs(self) -> ResultSeries:
        """step -> :class:`~curvscope.linalg.Eigenpairs` of the "top" measurement."""
        return self.results("top")

    @property
    def traces(self) -> ResultSeries:
        """step -> :class:`~curvscope.linalg.TraceEstimate`."""
        return self.results("trace")

    def snapshot_dir(self, step: int) -> Path:
        """The folder of snapshot ``step``."""
        return self._dirs[int(step)]

    def load(self, step: int, name: str) -> Any:
        """Load result ``name`` of snapshot ``step``.

        A result whose manifest type is one of :func:`result_classes` loads with that class's
        ``load``; any other type (``"arrays"``, a user's class) loads as ``(arrays, meta)``
        with :func:`~curvscope.results.load_result`. A type name from the folder is never
        imported or called.

        Raises:
            KeyError: No committed snapshot at ``step``, or it holds no result ``name``.
            ValueError: The result's files do not hold what their type writes (the message
                names the snapshot, the file and the field).
        """
        step = int(step)
        if step not in self._manifests:
            raise KeyError(f"no committed snapshot at step {step} in {self.path}")
        entry = self._manifests[step].get("results", {}).get(name)
        if entry is None:
            raise KeyError(f"snapshot {step} has no result {name!r}")
        base = self._dirs[step] / name
        type_name = entry.get("type", "arrays")
        loader = _loader(type_name)
        try:
            return loader(base) if loader is not None else load_result(base)
        except ValueError as error:
            raise ValueError(
                f"result {name!r} of step {step} in {self.path} does not load as {type_name} "
                f"(the files are not what its save writes: damaged or crafted): {error}"
            ) from error

    def table(self) -> list[dict[str, Any]]:
        """One dict per snapshot: {"step": ..., scalar: value, ...} (missing -> NaN)."""
        return [
            {"step": int(step), **{name: float(values[i]) for name, values in self.scalars.items()}}
            for i, step in enumerate(self.steps)
        ]

    def to_pandas(self) -> Any:
        """The :meth:`table` as a pandas DataFrame indexed by nothing (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Run.to_pandas needs pandas (pip install pandas); Run.table() gives the same "
                "rows as a list of dicts without it"
            ) from None
        return pd.DataFrame(self.table(), columns=["step", *self.scalars])

    def __len__(self) -> int:
        return int(self.steps.size)

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, snapshots={len(self)}, scalars={list(self.scalars)}, "
            f"problems={len(self.problems)})"
        )


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _differing_fields(index_row: dict[str, Any], snapshot_row: dict[str, Any]) -> list[str]:
    """``"name (index X, snapshot Y)"`` for each field where the two rows differ.

    NaN equals NaN; a field only one row has differs.
    """
    absent = object()
    out = []
    for name in sorted(set(index_row) | set(snapshot_row)):
        a, b = index_row.get(name, absent), snapshot_row.get(name, absent)
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if a != b and not both_nan:
            shown = ["absent" if value is absent else repr(value) for value in (a, b)]
            out.append(f"{name} (index {shown[0]}, snapshot {shown[1]})")
    return out


def result_classes() -> dict[str, type]:
    """The result classes a snapshot's manifest may name, by the type name a RunStore writes.

    Keys are ``module.QualifiedName``; only these are loaded with their own ``load``.
    """
    from ..analysis.blocks import BlockSpectra
    from ..analysis.overlap import GradientOverlap
    from ..analysis.structure import SpectrumStructure
    from ..linalg.density import SpectralDensity
    from ..linalg.eigs import Eigenpairs
    from ..linalg.nonnormal import TransientBounds
    from ..linalg.trace import TraceEstimate

    classes = (
        SpectralDensity,
        TraceEstimate,
        Eigenpairs,
        TransientBounds,
        SpectrumStructure,
        GradientOverlap,
        BlockSpectra,
    )
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes}


#: Type names older curvscope versions wrote for a class that has moved since -> the current
#: name; run folders written before the move load with the class's ``load`` all the same.
FORMER_TYPE_NAMES = {
    "curvscope.analysis.density.SpectrumStructure": (
        "curvscope.analysis.structure.SpectrumStructure"
    ),
}


def _loader(type_name: str) -> Any:
    """``cls.load`` when ``type_name`` is one of :func:`result_classes`, else None.

    None for plain ``"arrays"``, or any other name, for :func:`~curvscope.results.load_result`.

    A type name read from a run folder is only looked up in that fixed table: it is never
    imported, resolved as an attribute or called.
    """
    if not isinstance(type_name, str):
        return None
    cls = result_classes().get(FORMER_TYPE_NAMES.get(type_name, type_name))
    return None if cls is None else cls.load


def load_run(path: str | os.PathLike[str], check_hashes: bool = True, warn: bool = True) -> Run:
    """Read a run folder written by a :class:`RunStore` (also while it is being written).

    Args:
        path: The run folder.
        check_hashes: Compare every snapshot file with the sha256 in its manifest (reads every
            byte once, about 1 ms per MB: 34 ms for 50 snapshots of a 10 x 80 density and a
            top eigenvector of n = 100k), so a corruption that keeps the size is found too.
            False checks sizes only.
        warn: Emit one warning when problems were found.

    Returns:
        :class:`Run`: ``steps``, ``scalars`` (arrays aligned with steps), ``densities`` and
        other results loaded on access, ``table()``, and ``problems``. A snapshot whose files
        do not check out is left out of ``steps`` and listed in ``problems``; an index line
        that disagrees with its snapshot's ``scalars.json`` is listed too (the snapshot's
        values are used).
    """
    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.exists():
        raise FileNotFoundError(
            f"{run_file} does not exist: {path} is not a curvscope run folder (written by a "
            "Tracker or RunStore)"
        )
    meta = json.loads(run_file.read_text())
    scan = scan_snapshots(path / SNAPSHOTS, check_hashes=check_hashes)
    problems = list(scan.problems)
    rows, line_problems, _ = read_index(path / INDEX_FILE)
    problems.extend(line_problems)
    index = path / INDEX_FILE
    latest: dict[int, tuple[int, dict[str, Any]]] = {}  # step -> its last (line number, row)
    for number, row in rows:
        step = row["step"]
        if step in latest:
            problems.append(
                RunProblem(
                    f"{index}:{latest[step][0]}",
                    f"line for step {step} superseded by line {number} (a resume redid the "
                    "step after its snapshot was damaged, or the index is damaged); ignored",
                )
            )
        latest[step] = (number, row)
    for step, (number, row) in sorted(latest.items(), key=lambda item: item[1][0]):
        if step not in scan.valid:
            problems.append(
                RunProblem(
                    f"{index}:{number}",
                    f"step {step} has no readable snapshot folder "
                    f"(snapshots/{step_dirname(step)}): see the problems with it",
                )
            )
        elif differing := _differing_fields(row, scan.rows[step]):
            problems.append(
                RunProblem(
                    f"{index}:{number}",
                    f"line for step {step} disagrees with snapshots/{step_dirname(step)}/"
                    f"{SCALARS_FILE} on {'; '.join(differing)}; the snapshot's values are used "
                    "(the snapshot folders are the truth, the index a convenience copy)",
                )
            )
    indexed = set(latest)
    for step in sorted(set(scan.valid) - indexed):
        problems.append(
            RunProblem(
                str(scan.valid[step]),
                f"step {step} is committed but missing from {INDEX_FILE} (the writer stopped "
                "between the snapshot's rename and the index append); read from its "
                f"{SCALARS_FILE}",
            )
        )
    run = Run(path, meta, scan, problems)
    if problems and warn:
        warnings.warn(
            f"{path}: {len(problems)} problem(s) in the run folder, see Run.problems; "
            f"first: {problems[0]}",
            stacklevel=2,
        )
    return run
