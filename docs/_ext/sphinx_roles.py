"""Griffe extension: Sphinx conventions of curvscope's docstrings, for mkdocstrings.

Three conventions are translated: ``#:`` comments above a module or class attribute become its
docstring (as Sphinx's autodoc reads them), doctest examples (``>>>`` lines and their output)
become Python console code blocks instead of Markdown quotes, and roles become
cross-references.

Roles: curvscope's docstrings name other objects the Sphinx way (:func:`spectral_density`,
:class:`~curvscope.linalg.SpectralDensity`, :mod:`.smoothing`, :data:`MEASUREMENTS`), which
Markdown would print literally. Each role is resolved the way Sphinx resolves it (the full
path; else the name inside the enclosing class, module and packages, innermost first; else
the one object whose path ends with the name) and replaced by an optional autorefs reference:
a link where the object is on a page of the API reference, plain code where it is not (a
private helper, the command-line internals). A role that names no object of curvscope at all
(a typo, a renamed function) logs a warning, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from griffe import Alias, Docstring, Extension, Module, Object

# mkdocs counts warnings of the "mkdocs" logger tree; --strict fails on any.
_log = logging.getLogger("mkdocs.curvscope.sphinx_roles")

_ROLE = re.compile(r":(?:py:)?(mod|func|class|meth|attr|data|obj|exc|const):`(~?)([^`<>]+)`")


def _walk(obj: Object, paths: dict[str, str]) -> None:
    """Record path -> canonical path of ``obj`` and everything defined under it."""
    paths[obj.path] = obj.path
    for member in obj.members.values():
        if isinstance(member, Alias):
            try:
                target = member.final_target.path
            except Exception:  # an alias to another package (torch, numpy): not ours
                continue
            if target.split(".")[0] == obj.path.split(".")[0]:
                paths[member.path] = target
        elif member.path.startswith(obj.path + "."):
            _walk(member, paths)


def _fence_doctests(text: str) -> str:
    """Wrap each doctest block (a ``>>>`` line to the next blank line) in a pycon fence."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(indent + "```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(indent + "```")
    return "\n".join(out)


def _comment_docstring(attr: Object) -> None:
    """Give ``attr`` the docstring written as ``#:`` comment lines right above it."""
    try:
        lines = attr.lines_collection[attr.filepath]
    except Exception:  # no source (a compiled module)
        return
    index = (attr.lineno or 0) - 2  # the line above the assignment, 0-based
    comment: list[str] = []
    while 0 <= index < len(lines) and lines[index].strip().startswith("#:"):
        comment.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    if comment:
        attr.docstring = Docstring("\n".join(comment), lineno=index + 2, parent=attr)


class SphinxRoles(Extension):
    """Rewrite Sphinx roles into optional autorefs cross-references, once per package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        """Resolve and rewrite every docstring of the loaded package ``pkg``."""
        paths: dict[str, str] = {}
        _walk(pkg, paths)
        for path in sorted(paths):
            if paths[path] != path:
                continue
            obj = pkg if path == pkg.path else pkg.get_member(path[len(pkg.path) + 1 :])
            if obj.docstring is None and obj.is_attribute:
                _comment_docstring(obj)
            if obj.docstring is not None:
                obj.docstring.value = _fence_doctests(obj.docstring.value)
                obj.docstring.value = _ROLE.sub(
                    lambda m, obj=obj: self._replace(m, obj, paths), obj.docstring.value
                )

    @staticmethod
    def _is_module(path: str, obj: Object) -> bool:
        try:
            return obj.modules_collection.get_member(path).is_module
        except Exception:
            return False

    @staticmethod
    def _resolve(name: str, obj: Object, paths: dict[str, str]) -> str | None:
        name = name.strip().lstrip(".").removesuffix("()")
        if name in paths:
            return paths[name]
        scope: Object | None = obj
        while scope is not None:
            if f"{scope.path}.{name}" in paths:
                return paths[f"{scope.path}.{name}"]
            scope = scope.parent
        matches = sorted((p for p in paths if p.endswith("." + name)), key=len)
        return paths[matches[0]] if matches else None

    def _replace(self, match: re.Match[str], obj: Object, paths: dict[str, str]) -> str:
        role, tilde, name = match.groups()
        name = re.sub(r"\s+", "", name)  # a role broken across lines
        shown = name.strip().split(".")[-1] if tilde else name.strip()
        if role in ("func", "meth") and not shown.endswith(")"):
            shown += "()"
        target = self._resolve(name, obj, paths)
        # A function re-exported under its module's name (curvscope.linalg.trace is the module
        # trace.py and, in linalg's namespace, its function trace): the role names the function.
        if target is not None and role != "mod":
            inner = f"{target}.{target.rsplit('.', 1)[-1]}"
            if paths.get(target) == target and self._is_module(target, obj) and inner in paths:
                target = paths[inner]
        if target is None:
            where = f"{obj.relative_filepath}:{obj.lineno}"
            _log.warning(
                f"{where}: {match.group(0)} in the docstring of {obj.path} names no object"
            )
            return f"<code>{html.escape(shown)}</code>"
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )
