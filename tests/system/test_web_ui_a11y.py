"""The web page for keyboard and screen-reader users, in a real browser against a real server
with the tiny model and a writable gallery: every action by keyboard alone, focus that stays
somewhere sensible, names a screen reader can say, live regions for results, unsaved caption
edits that survive, and a layout that reflows at 320 CSS pixels (400 % zoom) without cutting off.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.axe import AXE_ENV, axe_path, violations
from tests.support.browser import (
    RECORD_TEXTS,
    VIEWPORT,
    chromium,
    fresh_tab,
    open_view,
    page_server,
    screenshot_dir,
)
from tests.support.gallery_data import GalleryData, make_gallery
from tests.support.processes import http_json

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import FilePayload, FloatRect, ViewportSize, expect

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Locator, Page

TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)

# The element that has focus, described the way the tests compare it.
FOCUSED = """() => {
  const element = document.activeElement;
  if (!element || element === document.body) return "body";
  return element.id || element.getAttribute("aria-label") || element.tagName.toLowerCase();
}"""
# Whether an element sits inside a live region (so a screen reader reads its changes out).
IN_LIVE_REGION = """element => Boolean(element.closest(
  '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log]'))"""


# The labels shown on another line than their control (a "Task" left at the end of one row,
# its list on the next).
LABELS_APART = """() => [...document.querySelectorAll("label[for]")].filter((label) => {
  const control = document.getElementById(label.htmlFor);
  if (!label.offsetParent || !control || !control.offsetParent) return false;
  const [a, b] = [label.getBoundingClientRect(), control.getBoundingClientRect()];
  return a.bottom <= b.top || b.bottom <= a.top;
}).map((label) => label.htmlFor)"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> GalleryData:
    return make_gallery(tmp_path_factory.mktemp("web-ui-a11y-data"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data: GalleryData) -> Iterator[str]:
    options = ["--gallery", str(data.root), "--gallery-writable", "--gallery-page-size", "3"]
    with page_server(tmp_path_factory, "web-ui-a11y", *options) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab per test: focus, drafts and dialogs never carry over."""
    with fresh_tab(browser, TIMEOUT_MS) as tab:
        yield tab


def tab_to(page: Page, wanted: str, most: int = 40) -> list[str]:
    """Press Tab from where focus is until ``wanted`` has it; the stops passed, for the message."""
    passed = []
    for _ in range(most):
        page.keyboard.press("Tab")
        passed.append(page.evaluate(FOCUSED))
        if passed[-1] == wanted:
            return passed
    raise AssertionError(f"Tab never reached {wanted!r}; it went {passed}")


def native_caption(server: str, image: Path, task: str) -> str:
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "prompt": task}
    status, reply = http_json(server + "/process_image", body)
    assert status == 200, reply
    return str(reply["result"])


def test_try_it_by_keyboard_alone(page: Page, server: str, data: GalleryData) -> None:
    # Playwright catches file choosers only once it has told the browser to, which a listener
    # added just before the key press can lose the race with: one listens from the start.
    page.on("filechooser", lambda _chooser: None)
    open_view(page, server, "try")
    expect(page.locator("#model-choice")).to_be_hidden()  # one model: no list to tab through
    page.select_option("#task", "<CAPTION>")
    page.focus("#nav-status")  # start on the tabs, as a keyboard user does
    tab_to(page, "file")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(data.root / "img01.png"))
    page.wait_for_selector("body[data-try-state=done]")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(data.root / "img02.png"))
    expected = native_caption(server, data.root / "img02.png", "<CAPTION>")
    caption = page.locator("#try-caption")
    expect(caption).to_have_text(expected)
    assert caption.evaluate(IN_LIVE_REGION), "the caption arrives unheard"
    assert page.locator("#try-timing").evaluate(IN_LIVE_REGION)
    assert page.evaluate(FOCUSED) == "file"  # focus stays where the user left it


def test_caption_again_by_keyboard_keeps_focus(page: Page, server: str, data: GalleryData) -> None:
    """The button is unavailable while its caption runs; it used to be disabled, which threw
    the focus out of it to the top of the page."""
    open_view(page, server, "try")
    page.set_input_files("#file", str(data.root / "img03.png"))
    page.wait_for_selector("body[data-try-state=done]")
    page.get_by_role("button", name="Caption again").focus()
    page.evaluate("() => { document.body.dataset.tryState = 'pressed'; }")
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-try-state=done]")
    assert page.evaluate(FOCUSED) == "run"
    expect(page.get_by_role("button", name="Caption again")).to_have_attribute("aria-disabled", "false")


def test_the_polled_status_line_is_not_read_out(page: Page, server: str) -> None:
    """It changes every second while work runs: as a live region it talked over everything."""
    open_view(page, server, "try")
    expect(page.locator("#status-line")).to_contain_text("test:tiny")
    assert not page.locator("#status-line").evaluate(IN_LIVE_REGION)


def test_errors_are_announced(page: Page, server: str) -> None:
    open_view(page, server, "try")
    page.set_input_files("#file", files=FilePayload(name="bad.png", mimeType="image/png", buffer=b"nope"))
    page.wait_for_selector("body[data-try-state=failed]")
    expect(page.get_by_role("alert").filter(has_text="HTTP 4")).to_be_visible()


def test_the_tabs_work_as_the_aria_tabs_pattern_says(page: Page, server: str) -> None:
    """The views are a tab list: the shown tab is selected (heard, not only underlined), the
    arrows go round the tabs showing each, Home and End go to the ends, and the list is one
    Tab stop: Tab from it goes into the shown panel, Shift+Tab back to the shown tab. They were
    links, and after one was pressed Tab went on through the other links and the header."""
    open_view(page, server, "gallery")
    tabs = page.get_by_role("tablist", name="views")

    def tab(name: str) -> Locator:
        return tabs.get_by_role("tab", name=name, exact=True)

    def shown(name: str, element_id: str) -> None:
        expect(tab(name)).to_have_attribute("aria-selected", "true")
        expect(page.get_by_role("tabpanel", name=name, exact=True)).to_be_visible()
        assert page.evaluate(FOCUSED) == element_id  # focus went with the arrow
        assert [t.get_attribute("tabindex") for t in tabs.get_by_role("tab").all()].count("0") == 1

    expect(tab("Gallery")).to_have_attribute("aria-selected", "true")
    expect(tab("Try it")).to_have_attribute("aria-selected", "false")
    tab("Gallery").focus()
    page.keyboard.press("ArrowRight")
    shown("Status", "nav-status")
    expect(tab("Gallery")).to_have_attribute("aria-selected", "false")
    expect(page.get_by_role("tabpanel", name="Gallery")).to_be_hidden()
    page.keyboard.press("ArrowRight")  # round the end
    shown("Try it", "nav-try")
    page.keyboard.press("ArrowLeft")
    shown("Status", "nav-status")
    page.keyboard.press("Home")
    shown("Try it", "nav-try")
    page.keyboard.press("End")
    shown("Status", "nav-status")
    page.keyboard.press("ArrowLeft")
    shown("Gallery", "nav-gallery")
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED) == "page-gallery"  # into the panel, not the next tab
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED) == "q"  # then the panel's first control, the search box
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED) == "nav-gallery"  # back to the shown tab
    tab("Try it").press("Enter")  # a tab is still a link: Enter (and a click) shows it
    shown("Try it", "nav-try")
    page.go_back()  # and the browser's Back returns to the one before
    expect(tab("Gallery")).to_have_attribute("aria-selected", "true")


def test_an_error_that_stops_a_request_is_an_alert_and_progress_is_polite(page: Page, server: str) -> None:
    """What the user asked for did not happen: that is read out at once (an alert), not queued
    behind whatever the reader is saying. Progress and results stay polite."""
    open_view(page, server, "gallery")
    page.get_by_role("button", name="Re-caption selected").press("Enter")
    alert = page.get_by_role("alert").filter(has_text="Select some images first.")
    expect(alert).to_have_count(1)
    expect(alert).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Select some images first.")).to_have_count(0)
    page.get_by_role("checkbox", name="img01.png").press("Space")
    page.get_by_role("button", name="Re-caption selected").press("Enter")
    page.wait_for_selector("body[data-recaption=done]")
    expect(page.get_by_role("status").filter(has_text=re.compile(r"^captioned 1 of 1 with "))).to_have_count(
        1
    )
    expect(page.locator("#gallery-alert")).to_have_text("")  # the old error went with the new progress
    page.get_by_role("button", name="Clear selection").press("Enter")
    page.get_by_role("button", name="Export selected (JSONL)").press("Enter")
    expect(alert).to_have_count(1)


def test_an_alert_said_again_word_for_word_is_read_out_again(page: Page, server: str) -> None:
    """The same text put in an alert again was no change to a screen reader: the second "Select
    some images first." went unheard. The alert is now drawn empty before it says it again."""
    open_view(page, server, "gallery")
    page.evaluate(RECORD_TEXTS, "gallery-alert")
    said = "Select some images first."
    for _ in range(2):
        page.get_by_role("button", name="Export selected (JSONL)").press("Enter")
        expect(page.get_by_role("alert").filter(has_text=said)).to_have_count(1)
        # the recorder looks once a frame: let a frame show it before the next press clears it
        page.wait_for_function(f"() => window.seen.at(-1) === {said!r}")
    page.wait_for_function(f"() => window.seen.filter((text) => text === {said!r}).length === 2")
    assert page.evaluate("() => window.seen") == ["", said, "", said]


def test_each_card_control_says_which_image(page: Page, server: str) -> None:
    """48 buttons all called "Save" tell a screen reader user nothing: each names its image."""
    open_view(page, server, "gallery")
    for path in ("img00.png", "img01.png", "img02.png"):
        expect(page.get_by_role("button", name=f"Save caption of {path}", exact=True)).to_have_count(1)
        expect(page.get_by_role("button", name=f"Caption now: {path}", exact=True)).to_have_count(1)
        expect(page.get_by_role("button", name=f"Show {path} full size", exact=True)).to_have_count(1)
        expect(page.get_by_role("textbox", name=f"caption of {path}", exact=True)).to_have_count(1)
        expect(page.get_by_role("checkbox", name=path, exact=True)).to_have_count(1)
    expect(page.get_by_role("status").filter(has_text="page 1 of 3")).to_have_count(1)


def test_the_selection_count_is_read_out(page: Page, server: str) -> None:
    open_view(page, server, "gallery")
    page.get_by_role("button", name="Select page").press("Enter")
    expect(page.get_by_role("status").filter(has_text="3 selected")).to_have_count(1)
    page.get_by_role("checkbox", name="img01.png").press("Space")
    expect(page.get_by_role("status").filter(has_text="2 selected")).to_have_count(1)


def test_the_whole_image_opens_and_closes_by_keyboard(page: Page, server: str) -> None:
    open_view(page, server, "gallery")
    page.focus("#next")
    opener = tab_to(page, "Show img00.png full size")[-1]
    page.keyboard.press("Enter")
    viewer = page.get_by_role("dialog", name="img00.png")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"^blob:"))
    assert page.evaluate(FOCUSED) == "viewer-close"
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()
    assert page.evaluate(FOCUSED) == opener  # back where it was opened, not lost
    page.keyboard.press("Enter")  # and once more, closed with its button this time
    expect(viewer).to_be_visible()
    page.keyboard.press("Enter")
    expect(viewer).to_be_hidden()
    assert page.evaluate(FOCUSED) == opener


def test_saving_by_keyboard_keeps_focus(page: Page, server: str, data: GalleryData) -> None:
    open_view(page, server, "gallery")
    box = page.get_by_role("textbox", name="caption of img02.png")
    box.focus()
    page.keyboard.type("a tree under a blue sky")
    card = page.locator('.card[data-path="img02.png"]')
    expect(card.locator(".card-message")).to_have_text("unsaved changes (Ctrl+S saves)")
    page.keyboard.press("Control+s")
    expect(card.locator(".card-message")).to_have_text("saved")
    assert (data.root / "img02.txt").read_text(encoding="utf-8") == "a tree under a blue sky"
    assert page.evaluate(FOCUSED) == "caption of img02.png"  # still typing in the same box
    page.keyboard.type(", green grass")
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED) == "Save caption of img02.png"
    page.keyboard.press("Enter")
    expect(card.locator(".card-message")).to_have_text("saved")
    assert (data.root / "img02.txt").read_text(encoding="utf-8") == "a tree under a blue sky, green grass"
    assert page.evaluate(FOCUSED) == "Save caption of img02.png"  # the redrawn button, not the page top
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED) == "Caption now: img02.png"


def test_an_unsaved_edit_survives_a_recaption_and_paging(page: Page, server: str, data: GalleryData) -> None:
    before = (data.root / "img00.txt").read_text(encoding="utf-8")
    open_view(page, server, "gallery")
    box = page.get_by_role("textbox", name="caption of img00.png")
    box.focus()
    page.keyboard.press("End")
    page.keyboard.type(", sleeping")
    page.get_by_role("button", name="Caption now: img00.png").press("Enter")
    card = page.locator('.card[data-path="img00.png"]')
    expect(card.locator('.source[data-source="<MORE_DETAILED_CAPTION>"]')).to_have_count(1)
    expect(box).to_have_value(before + ", sleeping")  # the redraw kept what was typed
    page.get_by_role("button", name="Next").press("Enter")
    expect(page.locator("#page-info")).to_have_text(
        "page 2 of 3 · 7 images · unsaved on other pages: img00.png"
    )
    page.get_by_role("button", name="Previous").press("Enter")
    expect(page.locator("#page-info")).to_have_text("page 1 of 3 · 7 images")  # shown on its card
    expect(box).to_have_value(before + ", sleeping")
    expect(card.locator(".card-message")).to_have_text("unsaved changes (Ctrl+S saves)")
    assert (data.root / "img00.txt").read_text(encoding="utf-8") == before  # nothing saved unasked
    asked: list[str] = []

    def answer(dialog: Dialog) -> None:
        asked.append(dialog.type)
        dialog.dismiss()

    page.on("dialog", answer)
    with page.expect_event("dialog"):  # a reload asks first; dismissed, the page stays
        page.evaluate("() => { setTimeout(() => location.reload()); }")
    assert asked == ["beforeunload"]
    expect(box).to_have_value(before + ", sleeping")


def test_focus_moves_to_the_other_pager_button_at_the_end(page: Page, server: str) -> None:
    open_view(page, server, "gallery")
    page.get_by_role("button", name="Next").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#page-info")).to_contain_text("page 2 of 3")
    page.keyboard.press("Enter")
    expect(page.locator("#page-info")).to_contain_text("page 3 of 3")
    expect(page.get_by_role("button", name="Next")).to_be_disabled()
    assert page.evaluate(FOCUSED) == "prev"  # not dropped on the page top with the disabled button


@pytest.mark.parametrize(
    ("width", "height", "scale"), [(320, 640, 1), (650, 450, 2)], ids=["320px", "zoom200"]
)
def test_nothing_is_cut_off_narrow_or_zoomed(
    browser: Browser, server: str, data: GalleryData, shots: Path, width: int, height: int, scale: int
) -> None:
    """320 CSS pixels is a 1280 px window at 400 % zoom (WCAG reflow); 650 at scale 2 is 200 %.
    The page must not scroll sideways: each view fits the width."""
    context = browser.new_context(
        viewport=ViewportSize(width=width, height=height), device_scale_factor=scale
    )
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        for view in ("try", "gallery", "status"):
            open_view(page, server, view)
            if view == "try":
                page.set_input_files("#file", str(data.root / "img04.png"))
                page.wait_for_selector("body[data-try-state=done]")
            if view == "status":
                page.wait_for_selector("#batches tr")
            page.screenshot(path=str(shots / f"a11y-{view}-{width}px-x{scale}.png"), full_page=True)
            sideways = page.evaluate(
                "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert sideways <= 0, f"{view} at {width} px scrolls {sideways} px sideways"
            assert page.evaluate(LABELS_APART) == [], f"{view} at {width} px: a label left its list"
            page.goto("about:blank")
    finally:
        context.close()


# Whether each visible button but the thumbnails (an image is their face) has an edge of its own.
BUTTONS_WITHOUT_EDGE = """() => [...document.querySelectorAll("button:not(.thumb-open)")]
  .filter((button) => button.offsetParent)
  .filter((button) => {
    const style = getComputedStyle(button);
    return style.borderTopStyle === "none" || style.borderTopWidth === "0px";
  })
  .map((button) => button.id || button.getAttribute("aria-label") || button.textContent)"""


def around(page: Page, element: Locator, margin: float = 6) -> FloatRect:
    """The element's box and a margin for its outline, in view (nothing scrolls after this)."""
    element.scroll_into_view_if_needed()
    box = element.bounding_box()
    assert box is not None
    return FloatRect(
        x=box["x"] - margin,
        y=box["y"] - margin,
        width=box["width"] + 2 * margin,
        height=box["height"] + 2 * margin,
    )


def blur(page: Page) -> None:
    page.evaluate("() => document.activeElement?.blur()")


def focus_is_seen(page: Page, target: str, ring_on: str | None = None) -> None:
    """Focus on ``target`` changes what is drawn around it (or around ``ring_on``)."""
    clip = around(page, page.locator(ring_on or target))
    blur(page)
    unfocused = page.screenshot(clip=clip)
    page.locator(target).focus()
    assert page.locator(target).evaluate("element => element.matches(':focus-visible')"), target
    assert page.screenshot(clip=clip) != unfocused, f"focus on {target} cannot be seen"


def test_forced_colours_keep_every_state_visible(page: Page, server: str, shots: Path) -> None:
    """Windows High Contrast (forced colours) paints text, borders and outlines in the user's
    colours, drops shadows and backgrounds, and shows transparent borders: the shown tab was
    marked by a border the others had too (transparent), the selected card by a shadow."""
    page.emulate_media(forced_colors="active")
    open_view(page, server, "status")
    assert page.evaluate("() => matchMedia('(forced-colors: active)').matches")
    blur(page)
    selected = page.locator("#nav-status").screenshot()
    page.evaluate("() => { location.hash = '#try'; }")
    page.wait_for_selector("body[data-page=try]")
    blur(page)
    assert page.locator("#nav-status").screenshot() != selected, "the shown tab looks like the others"
    for target, ring_on in (
        ("#nav-try", None),
        ("#page-try", None),
        ("#file", "label.pick"),
        ("#task", None),
    ):
        focus_is_seen(page, target, ring_on)
    page.screenshot(path=str(shots / "a11y-forced-colours-try.png"), full_page=True)

    open_view(page, server, "gallery")
    card = page.locator('.card[data-path="img00.png"]')
    box = around(page, card, margin=0)
    edge = FloatRect(x=box["x"] - 3, y=box["y"] + box["height"] - 4, width=box["width"] + 6, height=8)
    blur(page)
    plain = page.screenshot(clip=edge)
    card.get_by_role("checkbox").press("Space")  # the keyboard: a click would hide later focus rings
    blur(page)
    assert page.screenshot(clip=edge) != plain, "a selected card looks like the others"
    for target in (
        "#select-page",
        "#q",
        "#next",
        '.card[data-path="img00.png"] textarea',
        '.card[data-path="img00.png"] input.pick',
        '.card[data-path="img00.png"] .thumb-open',
    ):
        focus_is_seen(page, target)
    assert page.evaluate(BUTTONS_WITHOUT_EDGE) == []
    page.screenshot(path=str(shots / "a11y-forced-colours-gallery.png"), full_page=True)


def test_axe_finds_nothing_on_any_view(browser: Browser, server: str, data: GalleryData) -> None:
    """The rules engine over every view: a control without a name, an image without alt text,
    text below 4.5:1 contrast, a broken landmark or heading order fails here."""
    script = axe_path()
    if script is None:
        pytest.skip(
            f"no axe-core: `python -m tests.support.axe` fetches it (as .ci/run does), or set {AXE_ENV}"
        )
    context = browser.new_context(
        viewport=ViewportSize(width=VIEWPORT["width"], height=VIEWPORT["height"]), bypass_csp=True
    )
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        found: dict[str, list[str]] = {}
        open_view(page, server, "status")
        page.wait_for_selector("#st-state:not(:empty)")
        found["status"] = violations(page, script)
        open_view(page, server, "try")
        page.set_input_files("#file", str(data.root / "img03.png"))
        page.wait_for_selector("body[data-try-state=done]")
        found["try it, a caption"] = violations(page, script)
        page.set_input_files("#file", files=FilePayload(name="bad.png", mimeType="image/png", buffer=b"nope"))
        page.wait_for_selector("body[data-try-state=failed]")
        found["try it, an error"] = violations(page, script)
        open_view(page, server, "gallery")

        # By position, not by accessible name: a lost name must come out as axe's finding.
        def in_card(path: str, what: str) -> Locator:
            return page.locator(f'.card[data-path="{path}"] {what}')

        box = in_card("img01.png", "textarea")
        box.fill(box.input_value())  # typed but the same text: nothing unsaved
        in_card("img02.png", "textarea").press("End")
        page.keyboard.type(" (draft)")
        found["gallery, an unsaved caption"] = violations(page, script)
        in_card("img00.png", ".thumb-open").click()
        expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"^blob:"))
        found["the whole image"] = violations(page, script)
        page.keyboard.press("Escape")
        in_card("img00.png", "input.pick").check()
        in_card("img00.png", "button.fresh").click()
        page.wait_for_selector("body[data-recaption=done]")
        found["gallery, a fresh caption"] = violations(page, script)
        in_card("img02.png", "button.save").click()
        expect(in_card("img02.png", ".card-message")).to_have_text("saved")
        found["gallery, saved"] = violations(page, script)
    finally:
        context.close()
    assert {view: rules for view, rules in found.items() if rules} == {}
