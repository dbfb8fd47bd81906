"""Headless Chromium for the HTML report's browser test and benchmark: Playwright's Python API driving the system's
Chromium (Debian's ``chromium`` package; ``NEST_CHROMIUM`` names another executable). Playwright's own browser download
is never used (``playwright install`` needs the network).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The Chromium executable: ``$NEST_CHROMIUM``, else the first of :data:`CANDIDATES` on PATH."""
    env = os.environ.get("NEST_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def unavailable() -> str | None:
    """Why no browser can be driven here (one line), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    if chromium_path() is None:
        return "no Chromium executable (apt-get install chromium, or set NEST_CHROMIUM)"
    return None


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        b = p.chromium.launch(executable_path=chromium_path(), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def open_report(b, path: Path, width: int = 1400, height: int = 900):
    """Open ``path`` (file://) in a new page; wait until the viewer has rendered its first examples. Returns
    ``(page, ready_ms)``: milliseconds from navigation start to that point (parsing the HTML and the data blob, the
    tables and the first page of examples), as the page measured it (``window.nestReady``)."""
    # bypass_csp: the page forbids eval (its CSP), which Playwright's wait_for_function(string) uses
    page = b.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_function("window.nestReady !== undefined", timeout=60_000)
    page.nest_errors = errors  # checked by the callers: a script error or an alert() fails them
    return page, float(page.evaluate("window.nestReady"))
