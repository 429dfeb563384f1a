"""The page's HTML (curvscope.html_report.page): every text from a file is escaped wherever it
appears, the figures are embedded PNGs of the declared size, the numbers are spelled out."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
from htmlpage import image_bytes, parse
from matplotlib.figure import Figure

from curvscope.html_report.page import (
    CONTENT_SECURITY_POLICY,
    Image,
    Report,
    Section,
    Table,
    figure_png,
    number,
    numbers,
    png_size,
    render,
)

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "q" \'a\' </td></table>'
NOW = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)


def tiny_png(width_in: float = 2.0, height_in: float = 1.0, dpi: int = 50) -> bytes:
    figure = Figure(figsize=(width_in, height_in))
    figure.subplots().plot([0, 1], [1, 0])
    return figure_png(figure, dpi)


def report(text: str, png: bytes) -> Report:
    """A report with ``text`` in every field that can come from a file."""
    section = Section(
        title=text,
        source=text,
        summary=text,
        facts=[(text, text)],
        figures=[Image(png, alt=text, caption=text)],
        tables=[
            Table((text, "b"), [(text, "1.5")], caption=text, numeric=frozenset({1}), note=text)
        ],
        notes=[text],
        meta={text: text, "n": 3},
    )
    return Report(text, Path(text), "results", [section, Section("second")], [text], [text])


def test_every_field_is_escaped():
    png = tiny_png()
    hostile = render(report(HOSTILE, png), NOW)
    plain = render(report("plain words", png), NOW)
    assert "<script" not in hostile and HOSTILE not in hostile
    # The same elements, whatever the text: nothing in it became markup.
    assert parse(hostile).tags == parse(plain).tags
    page = parse(hostile)
    assert page.title == " ".join(HOSTILE.split())
    section = page.sections[0]
    assert section.title == " ".join(HOSTILE.split())
    (image,) = section.images
    assert image["alt"] == HOSTILE  # attributes are quoted and escaped too
    words = " ".join(HOSTILE.split())
    assert section.facts == {words: words, "n": "3"}  # the facts, then the folded metadata
    # Shown as text in each place: <title>, h1, the path, the contents (title, source), the
    # section (title, source, summary, fact label and value, caption of the figure, caption,
    # heading, cell and note of the table, note, metadata key and value), skipped, problems.
    assert page.text.count("alert(1)") == 3 + 2 + 13 + 2


def test_the_page_loads_nothing_and_declares_its_images():
    png = tiny_png(3.0, 1.5, dpi=40)
    text = render(report("x", png), NOW)
    assert f'content="{CONTENT_SECURITY_POLICY}"' in text
    assert "written 2026-01-02 03:04 UTC" in text
    page = parse(text)
    assert page.tags["script"] == 0 and page.tags["link"] == 0
    (image,) = page.images
    assert image_bytes(image) == png
    assert (image["width"], image["height"]) == ("120", "60") == tuple(map(str, png_size(png)))
    assert [t for t, name, _ in page.attributes if name == "href"] == ["a", "a"]  # the contents


def test_png_size_refuses_what_is_not_a_png():
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(b"GIF89a" + bytes(40))


def test_numbers_are_spelled_out():
    assert number(math.nan) == "NaN" and number(math.inf) == "inf" and number(-math.inf) == "-inf"
    assert number(None) == "n/a" and number(True) == "yes" and number("abc") == "abc"
    assert number(0.123456789) == "0.123457" and number(1234567.0, 3) == "1.23e+06"
    assert numbers([]) == "none"
    assert numbers(range(15), limit=3) == "0, 1, 2, ... (15 in all)"
