"""One self-contained HTML page for a results folder or a run folder (``curvscope report``).

What was measured and on what (model, n, samples, dtype, versions, wall time), the figures of
:mod:`curvscope.plot` embedded as PNG, the tables (eigenvalues with residuals, traces with
standard errors, structures: outliers, bulk edges, negative mass) and, for a run, the
evolution figures and a table of the snapshots. The page loads nothing and runs no script.

Layout: :mod:`.build` (find and read, write the file), :mod:`.results` (a command's results
folder), :mod:`.runs` (a run folder), :mod:`.tables`, :mod:`.facts` (metadata as settings),
:mod:`.page` (the parts and their HTML).

Example:
    >>> from curvscope.html_report import write_report  # doctest: +SKIP
    >>> path, report = write_report("results/density")  # doctest: +SKIP
"""

from __future__ import annotations

from .build import build_report, write_report
from .page import Image, Report, Section, Table, render

__all__ = ["Image", "Report", "Section", "Table", "build_report", "render", "write_report"]
