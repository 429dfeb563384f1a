"""Headless Chromium driven through the Chrome DevTools Protocol (CDP) over a websocket
(websocket-client): load a page, collect every console error, JavaScript exception and log
error, check that every image decoded, and take a full-page screenshot.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when absent); another
binary can be named with ``CURVSCOPE_CHROMIUM``. As a script::

    python tests/chromium.py PAGE.html SHOT.png   # prints the checks, writes the screenshot
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: Every image of the page, after ``img.decode()`` settled.
IMAGES_SCRIPT = """
Promise.all(Array.from(document.images).map(img =>
    img.decode().then(() => true, () => false).then(decoded => ({
        decoded: decoded, complete: img.complete,
        width: img.naturalWidth, height: img.naturalHeight, alt: img.alt,
    }))))
"""


def find_chromium() -> str | None:
    """CURVSCOPE_CHROMIUM, or the first Chromium or Chrome on PATH."""
    named = os.environ.get("CURVSCOPE_CHROMIUM")
    if named:
        return named
    for name in NAMES:
        if found := shutil.which(name):
            return found
    return None


def in_ci() -> bool:
    """True under CI (CI=true): the browser test must run there, never skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class PageCheck:
    """What loading a page showed.

    Attributes:
        images: One dict per ``<img>``: decoded, complete, width, height (natural), alt.
        errors: Console errors, uncaught exceptions and log errors, as text.
        warnings: Console and log warnings, as text.
        title: ``document.title``.
        scripts: Number of ``<script>`` elements.
        height: Height of the laid-out page in CSS pixels.
    """

    images: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    title: str = ""
    scripts: int = 0
    height: int = 0

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [
            image
            for image in self.images
            if not (image["decoded"] and image["complete"] and image["width"] > 0)
        ]


class Browser:
    """One headless Chromium with one tab, driven over CDP; close it with :meth:`close`."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 30):
        import websocket  # websocket-client, in the dev extra

        self.width, self.timeout = width, timeout
        self.profile = tempfile.mkdtemp(prefix="curvscope-chromium-")
        command = [
            binary,
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            f"--window-size={width},{height}",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        try:
            port = self._port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            page = next(t for t in targets if t.get("type") == "page")
            self.socket = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
            )
        except BaseException:
            self._stop()
            raise
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def _port(self) -> int:
        """The debugging port Chromium picked, from DevToolsActivePort in its profile."""
        file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"chromium exited at start with status {self.process.returncode}"
                )
            if file.is_file() and (lines := file.read_text().split()):
                return int(lines[0])
            time.sleep(0.05)
        raise TimeoutError(f"chromium wrote no {file.name} in {self.timeout} s")

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.socket.recv())
        if "id" not in message:
            self.events.append(message)
        return message

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a CDP method; its result (events that arrive meanwhile are kept)."""
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, method: str) -> dict[str, Any]:
        """Wait for the event ``method`` (one already received counts)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = self._receive()
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} in {self.timeout} s")

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression in the page (an exception raises)."""
        result = self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def load(self, path: str | os.PathLike[str]) -> PageCheck:
        """Open a file, wait for its load event and check its images and console."""
        self.events.clear()
        self.send("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        check = PageCheck(
            images=self.evaluate(IMAGES_SCRIPT, await_promise=True),
            title=self.evaluate("document.title"),
            scripts=self.evaluate("document.scripts.length"),
            height=self.evaluate("document.documentElement.scrollHeight"),
        )
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                check.errors.append(f"exception: {text}")
            elif method == "Runtime.consoleAPICalled":
                args = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]
                )
                if params.get("type") in ("error", "assert"):
                    check.errors.append(f"console.{params['type']}: {args}")
                elif params.get("type") == "warning":
                    check.warnings.append(f"console.warn: {args}")
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                text = f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
                if entry.get("level") == "error":
                    check.errors.append(text)
                elif entry.get("level") == "warning":
                    check.warnings.append(text)
        return check

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG of the whole page (all its height) at the window's width."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1},
        )
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def close(self) -> None:
        """Close the connection, end Chromium and remove its profile."""
        try:
            self.socket.close()
        finally:
            self._stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/chromium.py PAGE.html SHOT.png", file=sys.stderr)
        return 2
    binary = find_chromium()
    if binary is None:
        print("no chromium found (set CURVSCOPE_CHROMIUM)", file=sys.stderr)
        return 2
    browser = Browser(binary)
    try:
        check = browser.load(argv[0])
        browser.screenshot(argv[1])
    finally:
        browser.close()
    print(f"title    {check.title}")
    print(f"images   {len(check.images)}, broken {len(check.broken_images)}")
    print(f"errors   {check.errors}")
    print(f"warnings {check.warnings}")
    print(f"height   {check.height} px; screenshot {argv[1]}")
    return 0 if not check.errors and not check.broken_images else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
