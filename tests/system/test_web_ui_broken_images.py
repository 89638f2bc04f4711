"""The gallery of a folder where most files only look like images, for a screen-reader user, in
a real browser against a real server with the tiny model: the failed thumbnails are read out
once for the page (not once each), each card still says why, and a caption or a whole image
that cannot come is an alert: the gallery's one alert, naming the image, never one per card.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.axe import AXE_ENV, axe_path, violations
from tests.support.browser import VIEWPORT, chromium, page_server
from tests.support.images import image_bytes

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import ViewportSize, expect

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)
BROKEN = 5
# The text of every live region on the page that says something (what a reader has read out).
# The alert regions of the page, by id.
ALERTS = "() => [...document.querySelectorAll('[role=alert]')].map((region) => region.id || region.className)"
LIVE_TEXTS = """() => [...document.querySelectorAll(
    '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log]')]
  .map((region) => region.textContent.trim()).filter(Boolean)"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real image and ``BROKEN`` files that only have an image's name."""
    folder = tmp_path_factory.mktemp("web-ui-broken-data") / "dataset"
    folder.mkdir()
    (folder / "good.png").write_bytes(image_bytes(1))
    for index in range(BROKEN):
        (folder / f"broken{index:02d}.png").write_bytes(b"not a picture at all")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[str]:
    with page_server(tmp_path_factory, "web-ui-broken", "--gallery", str(root), "--gallery-writable") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def open_gallery(browser: Browser, server: str, *, bypass_csp: bool = False) -> BrowserContext:
    """A fresh context with one tab on the gallery, its first page listed."""
    context = browser.new_context(
        viewport=ViewportSize(width=VIEWPORT["width"], height=VIEWPORT["height"]), bypass_csp=bypass_csp
    )
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(f"{server}/#gallery")
    tab.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    return context


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh tab per test."""
    context = open_gallery(browser, server)
    try:
        yield context.pages[0]
    finally:
        context.close()


def test_failed_thumbnails_are_read_out_once_per_page(page: Page) -> None:
    """Each failed thumbnail used to put its error in its card's live region: a folder of 200
    broken images was 200 announcements."""
    expect(page.locator(".thumb.broken")).to_have_count(BROKEN)
    notice = f"{BROKEN} thumbnails could not be shown"
    expect(page.get_by_role("status").filter(has_text=notice)).to_have_count(1)
    assert sorted(page.evaluate(LIVE_TEXTS)) == sorted(["0 selected", "page 1 of 1 · 6 images", notice]), (
        "something else about the thumbnails was read out"
    )
    # Quietly on each card: shown, and heard as the description of its thumbnail's button.
    thumb = page.get_by_role("button", name="Show broken00.png full size")
    expect(thumb).to_have_accessible_description(re.compile(r"^No thumbnail for broken00\.png: "))
    expect(page.locator('.card[data-path="broken00.png"] .thumb-error')).to_be_visible()
    expect(page.get_by_role("button", name="Show good.png full size")).to_have_accessible_description("")
    page.get_by_role("button", name="Search").press("Enter")  # the same page again: said again, once
    page.wait_for_selector("body[data-gallery=ready]")
    expect(page.get_by_role("status").filter(has_text=notice)).to_have_count(1)
    expect(page.locator(".thumb.broken")).to_have_count(BROKEN)


def test_the_page_has_one_alert_per_view_not_one_per_card(page: Page) -> None:
    """Each card had an alert region of its own, empty: 48 live regions on a page of 48."""
    expect(page.locator(".card")).to_have_count(BROKEN + 1)
    expect(page.locator(".card [role=alert]")).to_have_count(0)
    views = ["gallery-alert", "key-error", "load-error", "try-error", "viewer-error"]
    assert sorted(page.evaluate(ALERTS)) == views


def test_a_caption_that_cannot_be_made_is_an_alert_naming_its_card(page: Page) -> None:
    card = page.locator('.card[data-path="broken01.png"]')
    page.get_by_role("button", name="Caption now: broken01.png").press("Enter")
    page.wait_for_selector("body[data-recaption=done]")
    alert = page.get_by_role("alert").filter(has_text=re.compile(r"^broken01\.png: "))
    expect(alert).to_contain_text("<MORE_DETAILED_CAPTION>")  # what was asked for, and why not
    expect(alert).not_to_have_text(re.compile(r"^broken01\.png: captioned"))
    said = alert.inner_text()
    expect(card.locator(".card-error")).to_have_text(said.removeprefix("broken01.png: "))  # and seen there
    expect(card.locator(".card-message")).to_have_text("")
    assert page.evaluate(LIVE_TEXTS).count(said) == 1
    page.get_by_role("checkbox", name="good.png").check()
    page.get_by_role("button", name="Re-caption selected").press("Enter")
    expect(page.get_by_role("status").filter(has_text=re.compile(r"^captioned 1 of 1 "))).to_have_count(1)
    expect(page.locator("#gallery-alert")).to_have_text(said)  # the page's progress is not about that card
    page.get_by_role("button", name="Caption now: broken02.png").press("Enter")  # another card's
    expect(page.get_by_role("alert").filter(has_text=re.compile(r"^broken02\.png: "))).to_have_count(1)
    expect(page.get_by_role("alert").filter(has_text=re.compile(r"^broken01\.png: "))).to_have_count(0)
    expect(card.locator(".card-error")).to_have_text(said.removeprefix("broken01.png: "))  # still shown
    page.get_by_role("textbox", name="caption of broken02.png").press_sequentially("x")
    expect(page.locator("#gallery-alert")).to_have_text("")  # its card said something new


def test_a_whole_image_that_cannot_be_shown_is_an_alert(page: Page) -> None:
    page.get_by_role("button", name="Show broken02.png full size").press("Enter")
    viewer = page.get_by_role("dialog", name="broken02.png")
    expect(viewer).to_be_visible()
    expect(viewer.get_by_role("alert")).to_have_text(
        "broken02.png cannot be shown: the browser cannot read it as an image."
    )
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Show good.png full size").press("Enter")
    expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"^blob:"))
    expect(page.get_by_role("dialog", name="good.png")).to_be_visible()
    expect(page.locator("#viewer-error")).to_have_text("")  # emptied: the good one shows, unannounced


def test_axe_finds_nothing_with_broken_thumbnails_and_an_alert(browser: Browser, server: str) -> None:
    script = axe_path()
    if script is None:
        pytest.skip(
            f"no axe-core: `python -m tests.support.axe` fetches it (as .ci/run does), or set {AXE_ENV}"
        )
    context = open_gallery(browser, server, bypass_csp=True)  # axe is an injected script
    try:
        page = context.pages[0]
        expect(page.locator(".thumb.broken")).to_have_count(BROKEN)
        page.get_by_role("button", name="Caption now: broken03.png").press("Enter")
        page.wait_for_selector("body[data-recaption=done]")
        found = {"broken thumbnails, a failed caption": violations(page, script)}
        page.get_by_role("button", name="Show broken04.png full size").press("Enter")
        expect(page.locator("#viewer-error")).not_to_be_empty()
        found["a whole image that cannot be shown"] = violations(page, script)
    finally:
        context.close()
    assert {view: rules for view, rules in found.items() if rules} == {}
