"""What a screen reader hears from the web page, in a real browser against a real server with the
tiny model and a writable gallery: a card's news is read out once, through the gallery's one
polite echo region with the image's name (the cards' own lines are not live regions), an error
that names its image is not prefixed with the name again, and an alert belongs to the view it
was raised in: coming back to a view shows its state without reading old alerts out as new.

Live regions are watched frame by frame, as the page is drawn (what the accessibility tree is
built from); a request is held in the browser (``page.route``) only to switch tabs before the
real server's answer comes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.axe import AXE_ENV, axe_path, violations
from tests.support.browser import RECORD_TEXTS, chromium, fresh_tab, open_view, page_server
from tests.support.images import image_bytes

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import FilePayload, expect

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)
IMAGES = ("img00.png", "img01.png", "img02.png", "twin.jpg", "twin.png")
SHARED = (
    "twin.jpg shares its caption file twin.txt with twin.png; neither is captioned, rename one of them"
    " (HTTP 409)"
)
TOO_LONG = 64 * 1024 + 1  # one past the longest caption a save takes
LIVE = '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log]'
# The live regions of the gallery's view, by id (or class where one has none).
GALLERY_LIVE = f"""() => [...document.querySelectorAll('#page-gallery :is({LIVE})')]
  .map((region) => region.id || region.className)"""
# The text of every live region on the page that says something.
LIVE_TEXTS = f"() => [...document.querySelectorAll('{LIVE}')].map((r) => r.textContent).filter(Boolean)"

# Resolves once the page has been drawn twice more (a shown alert has been seen by then).
TWO_FRAMES = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
# Records in window.alerted each text that appears, frame by frame, in a shown alert (role=alert
# with text, drawn): what a screen reader reads out at once. An alert hidden and shown again with
# the same text is recorded again, as a reader would read it again.
RECORD_ALERTS = """() => {
  window.alerted = [];
  let before = [];
  const look = () => {
    const now = [...document.querySelectorAll("[role=alert]")]
      .filter((box) => box.textContent && box.checkVisibility())
      .map((box) => [box.id, box.textContent]);
    const old = new Set(before.map(([id, text]) => `${id}\n${text}`));
    for (const [id, text] of now) if (!old.has(`${id}\n${text}`)) window.alerted.push(text);
    before = now;
    requestAnimationFrame(look);
  };
  look();
}"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three images and two (``twin.jpg``, ``twin.png``) that would share ``twin.txt``."""
    folder = tmp_path_factory.mktemp("web-ui-live-data") / "dataset"
    folder.mkdir()
    for seed, name in enumerate(IMAGES):
        (folder / name).write_bytes(image_bytes(seed, "JPEG" if name.endswith(".jpg") else "PNG"))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[str]:
    with page_server(tmp_path_factory, "web-ui-live", "--gallery", str(root), "--gallery-writable") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab per test (CSP bypassed for axe, an injected script)."""
    with fresh_tab(browser, TIMEOUT_MS, bypass_csp=True) as tab:
        yield tab


def show_tab(page: Page, view: str, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    page.wait_for_selector(f"body[data-page={view}]")


def hold(page: Page, route_glob: str) -> list[Route]:
    """Requests to ``route_glob`` wait in the browser until the test lets each go on."""
    held: list[Route] = []
    page.route(route_glob, lambda route: held.append(route))
    return held


def wait_held(page: Page, held: list[Route]) -> Route:
    while not held:
        page.wait_for_timeout(20)
    return held.pop()


def select_nothing_and_export(page: Page) -> None:
    """A new alert in the gallery ("Select some images first."), read out after any earlier one
    on its way (each waits a frame and a tenth of a second, in order)."""
    page.get_by_role("button", name="Export selected (JSONL)").press("Enter")
    expect(page.get_by_role("alert").filter(has_text="Select some images first.")).to_have_count(1)
    # RECORD_ALERTS looks once a frame: wait for the frame that shows it before reading its record
    page.wait_for_function("() => window.alerted.includes('Select some images first.')")


def test_cards_have_no_live_regions_and_their_news_is_heard_once_by_name(page: Page, server: str) -> None:
    """Each card's message line was a polite live region of its own: 48 on a page of 48. The
    gallery's view now has the same few regions however many cards it shows, and a card's news is
    read out in one of them, naming the image; the card still shows it, quietly."""
    open_view(page, server, "gallery")
    expect(page.locator(".card")).to_have_count(len(IMAGES))
    expect(page.locator(f".card :is({LIVE})")).to_have_count(0)
    assert sorted(page.evaluate(GALLERY_LIVE)) == [
        "card-status", "gallery-alert", "gallery-message", "page-info", "selected-count"
    ]  # fmt: skip
    page.evaluate(RECORD_TEXTS, "card-status")
    card = page.locator('.card[data-path="img01.png"]')
    page.get_by_role("textbox", name="caption of img01.png").press_sequentially("a dog")
    expect(card.locator(".card-message")).to_have_text("unsaved changes (Ctrl+S saves)")
    expect(page.locator("#card-status")).to_have_text("img01.png: unsaved changes (Ctrl+S saves)")
    # the recorder looks once a frame: let a frame show the news before the save replaces it
    page.wait_for_function("() => window.seen.at(-1) === 'img01.png: unsaved changes (Ctrl+S saves)'")
    save = page.get_by_role("button", name="Save caption of img01.png")
    for time in (1, 2):  # the same news twice is read out twice
        save.press("Enter")
        expect(card.locator(".card-message")).to_have_text("saved")
        page.wait_for_function(
            f"() => window.seen.filter((text) => text === 'img01.png: saved').length === {time}"
        )
    heard = [text for text in page.evaluate("() => window.seen") if text and "saving" not in text]
    assert heard == ["img01.png: unsaved changes (Ctrl+S saves)", "img01.png: saved", "img01.png: saved"]
    said = page.evaluate(LIVE_TEXTS)
    assert "saved" not in said and said.count("img01.png: saved") == 1  # once, not also on the card


def test_an_error_that_names_its_image_is_said_with_the_name_once(page: Page, server: str) -> None:
    """The save's error says "twin.jpg shares its caption file ...": the alert read out
    "twin.jpg: twin.jpg shares ...". A message that does not name its image still gets it first."""
    open_view(page, server, "gallery")
    card = page.locator('.card[data-path="twin.jpg"]')
    page.get_by_role("textbox", name="caption of twin.jpg").fill("a cat")
    page.get_by_role("button", name="Save caption of twin.jpg").press("Enter")
    expect(page.get_by_role("alert")).to_have_text(SHARED)
    expect(card.locator(".card-error")).to_have_text(SHARED)
    page.get_by_role("textbox", name="caption of img02.png").fill("x" * TOO_LONG)
    page.get_by_role("button", name="Save caption of img02.png").press("Enter")
    too_long = f"The caption is {TOO_LONG} characters; the limit is {TOO_LONG - 1}. (HTTP 400)"
    expect(page.get_by_role("alert")).to_have_text(f"img02.png: {too_long}")
    expect(page.locator('.card[data-path="img02.png"] .card-error')).to_have_text(too_long)


def test_an_alert_raised_in_a_hidden_view_is_not_read_out_when_it_is_shown(page: Page, server: str) -> None:
    """A save refused while the user was on the Status tab: its alert sat in the hidden gallery,
    unheard, and was read out as new when the user came back. Now the gallery shows it there,
    on its card and in its message line, as the view's state, and reads out only what comes after."""
    open_view(page, server, "gallery")
    held = hold(page, "**/ui/api/gallery/save")
    page.get_by_role("textbox", name="caption of twin.jpg").fill("a cat")
    page.get_by_role("button", name="Save caption of twin.jpg").press("Enter")
    request = wait_held(page, held)
    show_tab(page, "status", "Status")
    page.evaluate(RECORD_ALERTS)
    request.continue_()  # on to the real server, which refuses it
    card = page.locator('.card[data-path="twin.jpg"]')
    expect(card.locator(".card-error")).to_have_text(SHARED)
    show_tab(page, "gallery", "Gallery")
    expect(card.locator(".card-error")).to_be_visible()
    expect(page.locator("#gallery-alert")).to_contain_text(SHARED)  # shown where it was raised
    expect(page.locator("#gallery-alert")).to_be_visible()
    select_nothing_and_export(page)
    assert page.evaluate("() => window.alerted") == ["Select some images first."]


def test_an_alert_is_not_read_out_again_when_its_view_comes_back(page: Page, server: str) -> None:
    open_view(page, server, "gallery")
    page.evaluate(RECORD_ALERTS)
    page.get_by_role("textbox", name="caption of twin.jpg").fill("a cat")
    page.get_by_role("button", name="Save caption of twin.jpg").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text(SHARED)
    said = page.locator("#gallery-alert").inner_text()
    show_tab(page, "try", "Try it")
    show_tab(page, "gallery", "Gallery")
    expect(page.locator("#gallery-alert")).to_have_text(said)
    select_nothing_and_export(page)
    assert page.evaluate("() => window.alerted") == [said, "Select some images first."]


def test_try_it_keeps_an_error_raised_while_hidden_to_itself(page: Page, server: str) -> None:
    open_view(page, server, "try")
    held = hold(page, "**/ui/api/caption")
    bad = FilePayload(name="bad.png", mimeType="image/png", buffer=b"nope")
    page.set_input_files("#file", files=bad)
    request = wait_held(page, held)
    show_tab(page, "status", "Status")
    page.evaluate(RECORD_ALERTS)
    request.continue_()
    page.wait_for_selector("body[data-try-state=failed]")
    show_tab(page, "try", "Try it")
    error = page.locator("#try-error")
    expect(error).to_contain_text("HTTP 4")  # shown where it was raised
    said = error.inner_text()
    page.evaluate(TWO_FRAMES)
    assert page.evaluate("() => window.alerted") == []
    page.unroute("**/ui/api/caption")
    page.evaluate("() => { document.body.dataset.tryState = 'again'; }")
    page.get_by_role("button", name="Caption again").press("Enter")  # the same error, raised here
    page.wait_for_selector("body[data-try-state=failed]")
    expect(page.get_by_role("alert").filter(has_text="HTTP 4")).to_have_text(said)
    page.wait_for_function("() => window.alerted.length > 0")
    assert page.evaluate("() => window.alerted") == [said]


def test_axe_finds_nothing_on_views_come_back_to(page: Page, server: str) -> None:
    """The gallery with a card's news in the echo region and an error shown as the view's state
    (no longer an alert), Try it likewise."""
    script = axe_path()
    if script is None:
        pytest.skip(
            f"no axe-core: `python -m tests.support.axe` fetches it (as .ci/run does), or set {AXE_ENV}"
        )
    found: dict[str, list[str]] = {}
    open_view(page, server, "gallery")
    page.get_by_role("textbox", name="caption of img00.png").fill("a bird")
    page.get_by_role("button", name="Save caption of img00.png").press("Enter")
    expect(page.locator("#card-status")).to_have_text("img00.png: saved")
    page.get_by_role("textbox", name="caption of twin.jpg").fill("a cat")
    page.get_by_role("button", name="Save caption of twin.jpg").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text(SHARED)
    found["gallery, news and an alert"] = violations(page, script)
    show_tab(page, "try", "Try it")
    page.set_input_files("#file", files=FilePayload(name="bad.png", mimeType="image/png", buffer=b"nope"))
    page.wait_for_selector("body[data-try-state=failed]")
    show_tab(page, "gallery", "Gallery")
    found["gallery, come back to"] = violations(page, script)
    show_tab(page, "try", "Try it")
    found["try it, come back to"] = violations(page, script)
    assert {view: rules for view, rules in found.items() if rules} == {}
