"""Find what a folder holds, build its :class:`~.page.Report`, and write the page."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..tracking.store import RUN_FILE
from .page import Report, Section, render
from .results import PAGE_ORDER, folder_sections, is_blocks_folder
from .runs import run_sections

#: What the error for a folder without results tells the user to pass.
WHAT_TO_PASS = (
    "pass the folder a command wrote (the --out of curvscope density, top, trace, overlap, "
    "decompose or blocks), a run folder (curvscope track), or a folder of such folders"
)


def build_report(path: str | os.PathLike[str], title: str | None = None, dpi: int = 100) -> Report:
    """Read a results folder, a run folder, or a folder of them, into a :class:`Report`.

    A run folder (it has ``run.json``) gives the run's sections; any other folder gives the
    sections of the results in it and in each of its subfolders (one level: ``results/``
    with ``density/``, ``top/``, ... or runs). Nothing is computed but the structure of a
    density that was saved without one (no operator products).

    Args:
        path: The folder.
        title: Page title (default: "curvscope report: <folder name>").
        dpi: Resolution of the figures.

    Returns:
        The :class:`Report`.

    Raises:
        FileNotFoundError: ``path`` does not exist, or half of a result is missing.
        NotADirectoryError: ``path`` is a file.
        ValueError: The folder holds no curvscope result, or a result is damaged (the message
            names the file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {WHAT_TO_PASS}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder: {WHAT_TO_PASS}")
    if dpi < 10 or dpi > 600:
        raise ValueError(f"dpi must be between 10 and 600, got {dpi}")
    title = title or f"curvscope report: {path.resolve().name or path}"
    if (path / RUN_FILE).is_file():
        sections, problems = run_sections(path, path, dpi)
        return Report(title, path, "run", sections, problems=problems)
    sections, skipped = folder_sections(path, path, dpi)
    problems: list[str] = []
    groups: list[list[Section]] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name == "blocks" and is_blocks_folder(sub):
            continue  # shown with its parent, curvscope blocks' --out
        if (sub / RUN_FILE).is_file():
            found, run_problems = run_sections(sub, path, dpi)
            problems += [f"{sub.name}: {problem}" for problem in run_problems]
            skipped_here: list[str] = []
        else:
            found, skipped_here = folder_sections(sub, path, dpi)
        if found:
            groups.append(found)
            skipped += skipped_here
    nested = bool(groups)
    for group in sorted(groups, key=_rank):  # density, top, trace, ..., blocks, runs
        sections += group
    if not sections:
        detail = f" ({len(skipped)} file(s) not results: {skipped[0]})" if skipped else ""
        raise ValueError(f"{path} holds no curvscope results{detail}: {WHAT_TO_PASS}")
    return Report(title, path, "folders" if nested else "results", sections, skipped, problems)


def write_report(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> tuple[Path, Report]:
    """Build the report of ``path`` and write it as one self-contained HTML file.

    Args:
        path: A results folder, a run folder or a folder of them (see :func:`build_report`).
        out: The HTML file (default ``path/report.html``); written atomically.
        title: Page title.
        dpi: Resolution of the figures.

    Returns:
        (the file written, the :class:`Report`).

    Raises:
        IsADirectoryError: ``out`` is a folder.
        FileNotFoundError, NotADirectoryError, ValueError: See :func:`build_report`.
    """
    out = Path(path) / "report.html" if out is None else Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: pass the HTML file to write")
    report = build_report(path, title, dpi)
    text = render(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, report


def _rank(sections: list[Section]) -> int:
    """Place of a folder's sections on the page: by the last of their kinds in :data:`PAGE_ORDER`.

    (overlap's folder holds eigenpairs and the overlap: it goes with the overlaps.)
    """
    kinds = [section.kind for section in sections]
    return max((PAGE_ORDER.index(k) for k in kinds if k in PAGE_ORDER), default=len(PAGE_ORDER))
