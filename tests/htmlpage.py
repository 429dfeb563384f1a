"""A report page read back with the standard library's HTML parser: its sections, tables,
facts, images and tags, so that tests compare the page with the numbers that went in."""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class PageSection:
    title: str = ""
    source: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    images: list[dict[str, str]] = field(default_factory=list)
    text: str = ""


@dataclass
class Page:
    title: str = ""
    sections: list[PageSection] = field(default_factory=list)
    tags: Counter = field(default_factory=Counter)
    attributes: list[tuple[str, str, str]] = field(default_factory=list)  # (tag, name, value)
    text: str = ""

    def section(self, title: str, source: str | None = None) -> PageSection:
        """The one section whose title starts with ``title`` (and whose source contains
        ``source``)."""
        found = [
            s
            for s in self.sections
            if s.title.startswith(title) and (source is None or source in s.source)
        ]
        assert len(found) == 1, [(s.title, s.source) for s in self.sections]
        return found[0]

    @property
    def titles(self) -> list[str]:
        return [s.title for s in self.sections]

    @property
    def images(self) -> list[dict[str, str]]:
        return [image for s in self.sections for image in s.images]


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.section: PageSection | None = None
        self.stack: list[str] = []
        self.text: list[str] = []  # text of the element being read (h2, caption, th, td, p)
        self.table: list[list[str]] | None = None
        self.caption = ""
        self.row: list[str] | None = None
        self.facts = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.page.tags[tag] += 1
        for name, value in attrs.items():
            self.page.attributes.append((tag, name, value))
        self.stack.append(tag)
        if tag == "section" and attrs.get("id", "").startswith("section-"):
            self.section = PageSection()
            self.page.sections.append(self.section)
        elif tag == "table":
            self.table, self.caption = [], ""
            self.facts = "facts" in attrs.get("class", "")
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th", "h2", "caption", "title", "p"):
            self.text = []
        elif tag == "img" and self.section is not None:
            self.section.images.append(attrs)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass
        text = " ".join("".join(self.text).split())
        if tag == "title":
            self.page.title = text
        elif self.section is None:
            return
        elif tag == "h2" and not self.section.title:
            self.section.title = text
        elif tag == "p" and text.startswith("from ") and not self.section.source:
            self.section.source = text[len("from ") :]
        elif tag == "caption":
            self.caption = text
        elif tag in ("td", "th") and self.row is not None:
            self.row.append(text)
        elif tag == "tr" and self.table is not None and self.row is not None:
            self.table.append(self.row)
            self.row = None
        elif tag == "table" and self.table is not None:
            if self.facts:
                self.section.facts.update({r[0]: r[1] for r in self.table if len(r) == 2})
            else:
                self.section.tables[self.caption] = self.table
            self.table = None
        elif tag == "section":
            self.section = None

    def handle_data(self, data):
        self.text.append(data)
        self.page.text += data
        if self.section is not None:
            self.section.text += data


def parse(text: str) -> Page:
    parser = _Parser()
    parser.feed(text)
    parser.close()
    return parser.page


def image_bytes(image: dict[str, str]) -> bytes:
    """The PNG bytes of an ``<img>`` whose src is a base64 data URI."""
    prefix = "data:image/png;base64,"
    assert image["src"].startswith(prefix), image["src"][:60]
    return base64.b64decode(image["src"][len(prefix) :], validate=True)


def rows(table: list[list[str]]) -> dict[str, list[str]]:
    """{first cell: the other cells} of a table without its heading row."""
    return {row[0]: row[1:] for row in table[1:]}
