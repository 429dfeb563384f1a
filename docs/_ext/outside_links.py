"""MkDocs hook: links from a page to a file of the repository outside docs/.

The pages link to ``../README.md`` or ``../experiments/x.py``: right on the forge's file
view, but outside the site. Such a link to a file that exists is rewritten to the site's
``repo_url`` (``repo_url/blob/main/PATH``) when one is configured, else to its text followed
by the path in code. A link to a file that does not exist is left alone, so the build's
link check reports it (and ``--strict`` fails).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

_LINK = re.compile(
    r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)"
)


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    """Rewrite the page's links that leave docs/ (see the module docstring)."""
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_dir = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def replace(match: re.Match[str]) -> str:
        path = posixpath.normpath(posixpath.join("docs", page_dir, match["target"]))
        if path.startswith("..") or not (root / path).exists():
            return match.group(0)
        if repo_url:
            return f"[{match['text']}]({repo_url}/blob/main/{path}{match['anchor'] or ''})"
        if match["text"].strip("`") == path:
            return f"`{path}`"
        return f"{match['text']} (`{path}`)"

    return _LINK.sub(replace, markdown)
