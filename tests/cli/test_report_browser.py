"""The pages of ``curvscope report`` in a real browser: headless Chromium (Debian's
``chromium``) loads each page with every image decoded and no console error, no JavaScript
exception and no log error (a blocked network request would be one); a broken page is caught
by the same check.

Without Chromium (or websocket-client) the tests skip, except under CI (CI=true), where they
fail: ``.ci/run`` installs chromium, so a skip there would hide a page nobody looked at.
Set CURVSCOPE_SCREENSHOT_DIR to keep the screenshots.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from chromium import Browser, find_chromium, in_ci
from clitools import HOSTILE
from htmlpage import parse

from curvscope.html_report.page import png_size


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    missing = []
    if binary is None:
        missing.append("chromium (apt-get install chromium)")
    if importlib.util.find_spec("websocket") is None:
        missing.append("websocket-client (the dev extra)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if in_ci():
            pytest.fail(f"{message}; under CI it must run, not skip (.ci/run installs chromium)")
        pytest.skip(message)
    browser = Browser(binary)
    yield browser
    browser.close()


def keep(shot: Path) -> None:
    """Copy a screenshot to CURVSCOPE_SCREENSHOT_DIR when it is set."""
    folder = os.environ.get("CURVSCOPE_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / shot.name)


def assert_loads_cleanly(check, images: int) -> None:
    assert check.errors == []
    assert [w for w in check.warnings if "file://" in w] == []  # none about the page itself
    assert len(check.images) == images
    assert check.broken_images == []
    assert check.scripts == 0


def test_results_page_loads_with_every_image(browser, results_report):
    page_path, _ = results_report
    check = browser.load(page_path)
    assert_loads_cleanly(check, images=4)
    expected = parse(page_path.read_text())
    assert [(i["width"], i["height"]) for i in check.images] == [
        (int(i["width"]), int(i["height"])) for i in expected.images
    ]
    assert check.title == HOSTILE  # the title's markup is text, not elements


def test_run_page_loads_and_screenshots(browser, run_report, tmp_path):
    page_path, _ = run_report
    check = browser.load(page_path)
    assert_loads_cleanly(check, images=4)
    shot = browser.screenshot(tmp_path / "run_report.png")
    width, height = png_size(shot.read_bytes())
    assert width == browser.width and height == check.height > 2000
    keep(shot)


def test_the_check_catches_a_broken_page(browser, tmp_path):
    """A page with an undecodable image, a console error and an exception; and one whose
    Content-Security-Policy (the report's) blocks a remote image."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="cut">'
        '<script>console.error("boom"); throw new Error("kaput")</script></body></html>'
    )
    check = browser.load(broken)
    assert [i["alt"] for i in check.broken_images] == ["cut"]
    assert any("boom" in e for e in check.errors) and any("kaput" in e for e in check.errors)
    from curvscope.html_report.page import CONTENT_SECURITY_POLICY

    remote = tmp_path / "remote.html"
    remote.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        f'content="{CONTENT_SECURITY_POLICY}"><title>remote</title></head><body>'
        '<img src="http://127.0.0.1:9/figure.png" alt="remote"></body></html>'
    )
    check = browser.load(remote)
    assert [i["alt"] for i in check.broken_images] == ["remote"]
    assert any("Content Security Policy" in e for e in check.errors), check.errors
