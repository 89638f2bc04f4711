"""A real browser for the web page's tests: Playwright for Python driving the system's Chromium.

Playwright's own browser download is not reachable from CI, so the tests use Debian's
``chromium`` package (``.ci/run`` installs it) through ``executable_path``; without one the
browser tests skip and say why. Screenshots go to one folder per run, printed for the reader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.api import tiny_cache_dir
from tests.support.processes import tiny_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

CHROMIUM_ENV = "VISION_SERVER_TEST_CHROMIUM"
SCREENSHOTS_ENV = "VISION_SERVER_UI_SCREENSHOTS"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT: ViewportSize = {"width": 1300, "height": 900}  # wide enough for the page's two-column layout
# Records in window.seen, frame by frame as the page is drawn (what the accessibility tree is built
# from), each new text of the element with the id given: what a screen reader could hear.
RECORD_TEXTS = """(id) => {
  const box = document.getElementById(id);
  window.seen = [];
  const look = () => {
    if (window.seen.at(-1) !== box.textContent) window.seen.push(box.textContent);
    requestAnimationFrame(look);
  };
  look();
}"""


def chromium_path() -> str | None:
    """``$VISION_SERVER_TEST_CHROMIUM``, else the first Chromium on PATH (Debian: /usr/bin/chromium)."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return configured
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium for one test module (skips the module when there is none)."""
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium for the browser tests: `apt-get install chromium`, or set {CHROMIUM_ENV}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    # Chromium refuses to start its sandbox as root (CI containers run as root).
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def fresh_tab(browser: Browser, timeout_ms: int, **context_options: Any) -> Iterator[Page]:
    """A tab in a context of its own, of the page's test size: focus, drafts and dialogs never
    carry over from another test."""
    context = browser.new_context(viewport=VIEWPORT, **context_options)
    tab = context.new_page()
    tab.set_default_timeout(timeout_ms)
    try:
        yield tab
    finally:
        context.close()


@contextlib.contextmanager
def browser_tab(timeout_ms: int, **context_options: Any) -> Iterator[Page]:
    """One tab in a fresh Chromium context, for one test module."""
    with chromium() as browser, fresh_tab(browser, timeout_ms, **context_options) as tab:
        yield tab


def open_view(page: Page, server: str, view: str) -> None:
    """Open one of the page's views and wait until it is drawn (the gallery: its first page)."""
    page.goto(f"{server}/#{view}")
    page.wait_for_selector("body[data-ready=true]")
    if view == "gallery":
        page.wait_for_selector("body[data-gallery=ready]")


def screenshot_dir(factory: pytest.TempPathFactory) -> Path:
    """Where this run's screenshots go (``$VISION_SERVER_UI_SCREENSHOTS`` to keep them); printed."""
    configured = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(configured) if configured else factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nweb page screenshots: {folder}")
    return folder


@contextlib.contextmanager
def page_server(factory: pytest.TempPathFactory, name: str, *options: str) -> Iterator[str]:
    """The real server (the tiny model, 16 new tokens, one thread) with ``options`` for one
    browser test module; its address, and a drained stop afterwards."""
    tmp = factory.mktemp(f"{name}-server")
    with tiny_server(
        tmp, tiny_cache_dir(factory), "--max-new-tokens", "16", *options, env={"OMP_NUM_THREADS": "1"}
    ) as process:
        yield process.wait_listening(timeout=90)
        process.stop()
