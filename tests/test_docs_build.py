"""`make docs`: the site with its API reference builds with ``mkdocs build --strict``, and a
broken reference of each kind fails that build (mkdocs.yml, docs/_ext/).

Each build is a subprocess of a few seconds; the site goes to a temporary folder.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parent.parent


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def warnings_of(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The WARNING entries of a build's log, each with its continuation lines."""
    entries: list[str] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("WARNING"):
            entries.append(line)
        elif entries and line.startswith(" ") and not line.startswith(("INFO", "DEBUG")):
            entries[-1] += " " + line.strip()
    return entries


def test_site_builds_strict_with_api_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert warnings_of(proc) == []
    linalg = (site / "api" / "linalg" / "index.html").read_text()
    # The re-exported public names are documented with their docstrings.
    assert 'id="curvscope.linalg.spectral_density"' in linalg
    assert "Lanczos steps per probe" in linalg
    # Doctest examples are code blocks, not Markdown quotes of ">>>" lines.
    assert 'class="language-pycon"' in linalg and "<blockquote>" not in linalg
    # A Sphinx role (:class:`~curvscope.linalg.SpectralDensity` in spectrum_structure's
    # module) became a link to the object's entry on another page.
    analysis = (site / "api" / "analysis" / "index.html").read_text()
    assert 'href="../linalg/#curvscope.linalg.SpectralDensity"' in analysis
    assert ":class:" not in analysis and ":func:" not in analysis
    # usage.md links to ../README.md (outside docs/): rewritten, not a dead link on the site.
    usage = (site / "usage" / "index.html").read_text()
    assert "../README.md" not in usage and "<code>README.md</code>" in usage
    assert (site / "reading-a-spectrum" / "index.html").exists()
    # Every public name of the packages has an entry (a function named like its module, as
    # linalg's trace and lanczos, is easily lost; an attribute documented by a #: comment too).
    for package in ("linalg", "operators", "analysis", "tracking"):
        module = importlib.import_module(f"curvscope.{package}")
        page = (site / "api" / package / "index.html").read_text()
        for name in module.__all__:
            obj = getattr(module, name)
            ids = {f"curvscope.{package}.{name}"}
            if hasattr(obj, "__qualname__"):
                ids.add(f"{obj.__module__}.{obj.__qualname__}")
            assert any(f'id="{i}"' in page for i in ids), (
                f"docs/api/{package}.md has no entry for {name}: give it a docstring (a #: comment "
                f"for a constant), or render it explicitly there as trace is in linalg.md"
            )


def test_each_kind_of_broken_reference_fails_the_strict_build(tmp_path: Path) -> None:
    """One project with one broken reference of each kind; the build lists all and fails."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# a file outside docs/\n")
    (tmp_path / "src" / "rolepkg").mkdir(parents=True)
    (tmp_path / "src" / "rolepkg" / "__init__.py").write_text(
        '"""A package whose docstring names :func:`helper` (exists) and :func:`no_such_helper`."""'
        '\n\n\ndef helper() -> None:\n    """Do nothing."""\n'
    )
    (tmp_path / "docs" / "index.md").write_text(
        "# Broken references\n\n"
        "A page that does not exist: [page](nowhere.md).\n\n"
        "A heading that does not exist: [anchor](#no-such-heading).\n\n"
        "A file outside docs/ that does not exist: [file](../no_such_file.py).\n\n"
        "A file outside docs/ that exists, and is fine: [readme](../README.md).\n\n"
        "An API object that does not exist: [fn][curvscope.linalg.no_such_function].\n\n"
        "::: rolepkg\n"
    )
    config = (ROOT / "mkdocs.yml").read_text()
    for old, new in [
        ("docs_dir: docs", f"docs_dir: {tmp_path / 'docs'}"),
        ("paths: [src]", f"paths: [{ROOT / 'src'}, {tmp_path / 'src'}]"),
        ("- docs/_ext/", f"- {ROOT / 'docs' / '_ext'}/"),
    ]:
        assert old in config, f"mkdocs.yml no longer has {old!r}: update this test"
        config = config.replace(old, new)
    (tmp_path / "mkdocs.yml").write_text(config)

    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    warnings = warnings_of(proc)
    expected = {
        "page": "nowhere.md",
        "anchor": "#no-such-heading",
        "outside file": "../no_such_file.py",
        "API object": "curvscope.linalg.no_such_function",
        "Sphinx role": ":func:`no_such_helper`",
    }
    for kind, text in expected.items():
        assert any(text in w for w in warnings), f"no warning for the broken {kind}: {warnings}"
    assert len(warnings) == len(expected), warnings  # README.md and :func:`helper` are fine
