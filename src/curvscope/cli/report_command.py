"""``curvscope report``: one self-contained HTML page of a results folder or a run folder.

(The printed text of the other commands is :mod:`.report`; this is the ``report`` command.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import jsonout, options, report
from .errors import PROG, CLIError


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``curvscope`` subcommands."""
    parser = commands.add_parser(
        "report",
        formatter_class=options.FORMATTER,
        help="one HTML page of a results or run folder",
        description=options.wrap(
            "Write one self-contained HTML page (figures embedded as PNG, no script, nothing "
            "loaded from the network) of a results folder (the --out of density, top, trace, "
            "overlap, decompose or blocks), of a run folder (track), or of a folder of such "
            "folders: what was measured and on what (model, n, samples, dtype, versions, wall "
            "time), the figures, the tables (eigenvalues with residuals, trace with standard "
            "error, structure: outliers, bulk edges, negative mass) and, for a run, the "
            "evolution figures and a table of the snapshots. Nothing is measured again: no "
            "model is loaded."
        ),
        epilog="examples:\n"
        "  curvscope report results/density\n"
        "  curvscope report runs/gd --out gd.html --title 'GD at lr 2'\n"
        "  curvscope report results                 # every command's folder on one page\n",
    )
    parser.add_argument("path", metavar="PATH", help="the results folder or run folder")
    parser.add_argument(
        "--out", metavar="FILE", help="the HTML file to write (default: PATH/report.html)"
    )
    parser.add_argument("--title", help="page title (default: 'curvscope report: FOLDER')")
    parser.add_argument(
        "--dpi",
        type=options.positive_int,
        default=100,
        help="resolution of the embedded figures (default: 100)",
    )
    jsonout.json_option(parser)
    parser.add_argument(
        "--threads",
        type=options.positive_int,
        help="torch CPU threads (default: the CPUs this process may use, unless "
        "OMP_NUM_THREADS is set)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="accepted for symmetry; report draws no bar"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build the page and write it; name what it holds and where it went."""
    from ..html_report import write_report

    started = time.perf_counter()
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"{str(path)!r} does not exist: pass a results folder or a run folder")
    if not path.is_dir():
        raise CLIError(
            f"{str(path)!r} is a file: pass the folder that holds the results (or the run)"
        )
    out = Path(args.out) if args.out else path / "report.html"
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder: pass the HTML file to write")
    if not 10 <= args.dpi <= 600:
        raise CLIError(f"--dpi must be between 10 and 600, got {args.dpi}")
    written, page = write_report(path, out, title=args.title, dpi=args.dpi)
    for problem in page.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    figures = sum(len(section.figures) for section in page.sections)
    tables = sum(len(section.tables) for section in page.sections)
    what = {"run": "run folder", "results": "results folder", "folders": "folder of results"}
    print(
        f"curvscope report: {what.get(page.kind, page.kind)} {path}: {len(page.sections)} "
        f"section(s), {figures} figure(s), {tables} table(s)"
    )
    for section in page.sections:
        print(f"  {section.title}" + (f"  ({section.source})" if section.source else ""))
    if page.skipped:
        print(f"  not shown: {len(page.skipped)} file(s), listed at the end of the page")
    size = written.stat().st_size
    print(f"  wrote    {report.paths(written)} ({size / 1e6:.2f} MB, self-contained)")
    jsonout.emit(
        args,
        {
            "path": path,
            "kind": page.kind,
            "sections": [
                {"title": section.title, "source": section.source} for section in page.sections
            ],
            "num_figures": figures,
            "num_tables": tables,
            "skipped": len(page.skipped),
            "problems": list(page.problems),
            "bytes": size,
            "files": [written],
            "wall_time_s": time.perf_counter() - started,
        },
    )
    return 0
