"""The parts of a report page and their HTML: one self-contained document, no script.

A :class:`Report` is a list of :class:`Section` objects (facts, figures, tables, notes);
:func:`render` writes it as one HTML5 document whose figures are PNGs embedded as base64
``data:`` URIs and whose style sits in the page. Its Content-Security-Policy allows nothing
but those images and that style, so the page loads nothing from the network and runs no code.
Every text that comes from a file passes ``html.escape`` here, once.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__

#: Allows the embedded PNGs and the page's own style; no script, font, frame or connection.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d232a; background: #f6f7f9; line-height: 1.45; }
header, main, nav, footer { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 1.6em; margin: 0.3em 0; }
h2 { font-size: 1.3em; margin: 0 0 0.3em 0; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em 0; }
.meta { color: #5b6570; font-size: 0.92em; margin: 0.2em 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
              font-size: 0.92em; }
nav ol { columns: 2; margin: 0.4em 0 1em 0; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px;
          padding: 16px 20px; margin: 16px 0; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceff2; }
figcaption { color: #5b6570; font-size: 0.9em; }
.scroll { overflow-x: auto; }
caption { text-align: left; }
caption h3 { margin-top: 0.6em; }
table { border-collapse: collapse; margin: 6px 0 10px 0; font-size: 0.92em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6e9ed; text-align: left;
         vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap;
         font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.facts th { background: none; font-weight: 500; color: #5b6570; white-space: nowrap; }
.note { color: #5b6570; font-size: 0.92em; }
.problems li { color: #9a3412; }
details { margin-top: 8px; }
summary { cursor: pointer; color: #5b6570; }
footer { color: #5b6570; font-size: 0.85em; padding-bottom: 24px; }
"""


@dataclass
class Table:
    """A table of text cells.

    Attributes:
        head: Column headings, shape (c,).
        rows: Rows of c cells each (text; :func:`number` formats numbers).
        caption: Heading above the table.
        numeric: Column indices whose cells are right-aligned numbers.
        note: A line below the table.
    """

    head: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    numeric: frozenset[int] = frozenset()
    note: str = ""


@dataclass
class Image:
    """A figure rendered to PNG.

    Attributes:
        png: The PNG bytes.
        alt: Text alternative of the image.
        caption: Caption below the image.
    """

    png: bytes
    alt: str
    caption: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG's header."""
        return png_size(self.png)


@dataclass
class Section:
    """One result on the page (a density, eigenpairs, a run, ...).

    Attributes:
        title: Heading.
        source: The files it was read from, relative to the report's folder.
        summary: One or two sentences: what was measured.
        facts: (label, value) pairs: on what, with which settings, how long.
        figures: Figures, in order.
        tables: Tables, after the figures.
        notes: Lines after the tables (warnings, what was left out).
        meta: All metadata of the result, shown folded.
        kind: What it shows, for the order of a page of several folders: "density",
            "eigenpairs", "trace", "overlap", "decompose", "blocks", "structure" or "run".
    """

    title: str
    source: str = ""
    summary: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Image] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = ""


@dataclass
class Report:
    """A report page: its sections and what could not be shown.

    Attributes:
        title: Page title.
        path: The folder reported on.
        kind: "results" (a command's results folder), "run" (a run folder) or "folders"
            (a folder of results folders).
        sections: The sections, in page order.
        skipped: Files found but not shown, each with the reason.
        problems: Problems of a run folder (``Run.problems``), as text.
    """

    title: str
    path: Path
    kind: str
    sections: list[Section] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def figure_png(figure: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg, in memory; the figure is not kept)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk.

    Raises:
        ValueError: ``data`` does not start like a PNG file.
    """
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def number(value: Any, digits: int = 6) -> str:
    """A number with ``digits`` significant digits; NaN, inf and None spelled out."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def numbers(values: Any, limit: int = 12, digits: int = 4) -> str:
    """``0.53, 0.38, ... (22 in all)``: the first ``limit`` numbers."""
    values = [float(v) for v in values]
    if not values:
        return "none"
    shown = ", ".join(number(v, digits) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(table: Table) -> str:
    parts = ['<div class="scroll"><table>']
    if table.caption:
        parts.append(f"<caption><h3>{_e(table.caption)}</h3></caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in table.head) + "</tr></thead>")
    parts.append("<tbody>")
    for row in table.rows:
        cells = (
            f'<td class="num">{_e(cell)}</td>' if i in table.numeric else f"<td>{_e(cell)}</td>"
            for i, cell in enumerate(row)
        )
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    if table.note:
        parts.append(f'<p class="note">{_e(table.note)}</p>')
    return "".join(parts)


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f'<div class="scroll"><table class="facts"><tbody>{rows}</tbody></table></div>'


def _image(image: Image) -> str:
    width, height = image.size
    data = base64.b64encode(image.png).decode("ascii")
    caption = f"<figcaption>{_e(image.caption)}</figcaption>" if image.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(image.alt)}" '
        f'width="{width}" height="{height}">{caption}</figure>'
    )


def _meta(meta: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="mono">{_e(_meta_value(v))}</td></tr>'
        for k, v in sorted(meta.items(), key=lambda item: str(item[0]))
    )
    return (
        "<details><summary>All metadata</summary>"
        f'<div class="scroll"><table class="facts"><tbody>{rows}</tbody></table></div></details>'
    )


def _meta_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 400 else text[:400] + " ..."


def _section(section: Section, anchor: str) -> str:
    parts = [f'<section id="{anchor}"><h2>{_e(section.title)}</h2>']
    if section.source:
        parts.append(f'<p class="meta">from <code>{_e(section.source)}</code></p>')
    if section.summary:
        parts.append(f"<p>{_e(section.summary)}</p>")
    if section.facts:
        parts.append(_facts(section.facts))
    parts.extend(_image(image) for image in section.figures)
    parts.extend(_table(table) for table in section.tables)
    parts.extend(f'<p class="note">{_e(note)}</p>' for note in section.notes)
    if section.meta:
        parts.append(_meta(section.meta))
    parts.append("</section>")
    return "\n".join(parts)


def render(report: Report, now: datetime.datetime | None = None) -> str:
    """The report as one self-contained HTML5 document.

    Args:
        report: What to show.
        now: Time stamp of the page (default: the current UTC time).

    Returns:
        The document's text; figures are embedded, nothing is loaded from elsewhere.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y-%m-%d %H:%M UTC")
    anchors = [f"section-{i + 1}" for i in range(len(report.sections))]
    contents = "".join(
        f'<li><a href="#{a}">{_e(s.title)}</a>'
        + (f' <span class="meta">{_e(s.source)}</span>' if s.source else "")
        + "</li>"
        for a, s in zip(anchors, report.sections, strict=True)
    )
    body = [
        "<header>",
        f"<h1>{_e(report.title)}</h1>",
        f'<p class="meta">{_e(_kind_line(report))}: <code>{_e(report.path)}</code></p>',
        f'<p class="meta">written {_e(stamp)} by curvscope {_e(__version__)}</p>',
        "</header>",
        f"<nav><h2>Contents</h2><ol>{contents}</ol></nav>" if len(report.sections) > 1 else "",
        "<main>",
    ]
    if report.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in report.problems)
        body.append(
            f'<section id="problems"><h2>Problems in the run folder</h2>'
            f'<ul class="problems">{items}</ul></section>'
        )
    body.extend(_section(s, a) for s, a in zip(report.sections, anchors, strict=True))
    if report.skipped:
        items = "".join(f"<li><code>{_e(s)}</code></li>" for s in report.skipped)
        body.append(f'<section id="skipped"><h2>Files not shown</h2><ul>{items}</ul></section>')
    body += [
        "</main>",
        f"<footer>curvscope {_e(__version__)}: <code>curvscope report</code></footer>",
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(report.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


def _kind_line(report: Report) -> str:
    return {
        "run": "run folder",
        "results": "results folder",
        "folders": "folder of results",
    }.get(report.kind, report.kind)
