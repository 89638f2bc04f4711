"""The web page in a real browser (Chromium driven by Playwright) against a real server process
serving the tiny model with a writable gallery: Try it, paging and search, editing, re-captioning,
export, untrusted caption text, and the live status panel. Screenshots of each page are saved.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import browser_tab, page_server, screenshot_dir
from tests.support.gallery_data import XSS, GalleryData, make_gallery
from tests.support.processes import http_json

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import expect

if TYPE_CHECKING:
    from playwright.sync_api import Dialog, Page

TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> GalleryData:
    return make_gallery(tmp_path_factory.mktemp("web-ui-data"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data: GalleryData) -> Iterator[str]:
    options = ["--gallery", str(data.root), "--gallery-writable"]
    options += ["--gallery-page-size", "3", "--gallery-jsonl", str(data.jsonl)]
    with page_server(tmp_path_factory, "web-ui", *options) as url:
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Page]:
    with browser_tab(TIMEOUT_MS, accept_downloads=True) as tab:
        tab.dialogs = []  # type: ignore[attr-defined]

        def dismiss(dialog: Dialog) -> None:
            tab.dialogs.append(dialog.message)  # type: ignore[attr-defined]
            dialog.dismiss()

        tab.on("dialog", dismiss)
        tab.goto(server + "/")
        tab.wait_for_selector("body[data-ready=true]")
        yield tab


def native_caption(server: str, image: Path, task: str) -> str:
    """The same image and task through the native API: what the page must show."""
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "prompt": task}
    status, reply = http_json(server + "/process_image", body)
    assert status == 200, reply
    return str(reply["result"])


def open_gallery(page: Page, server: str) -> None:
    """A fresh load of the page (no search, no selection kept from an earlier test)."""
    page.goto("about:blank")
    page.goto(f"{server}/#gallery")
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")


def card_names(page: Page) -> list[str]:
    return page.locator(".card .name").all_inner_texts()


def card(page: Page, path: str) -> Any:
    return page.locator(f'.card[data-path="{path}"]')


def test_try_it_shows_the_caption_with_its_time(
    page: Page, server: str, data: GalleryData, shots: Path
) -> None:
    page.goto("about:blank")
    page.goto(server + "/#try")
    page.wait_for_selector("body[data-ready=true]")
    _, tasks = http_json(server + "/prompts")
    assert page.locator("#task option").all_inner_texts() == tasks
    image = data.root / "img02.png"
    page.select_option("#task", "<CAPTION>")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-try-state=done]")
    assert page.inner_text("#try-caption") == native_caption(server, image, "<CAPTION>")
    assert re.fullmatch(
        r"<CAPTION> in \d+\.\d+ s \(queue wait \d+\.\d+ s, batch of \d+\)", page.inner_text("#try-timing")
    )
    page.select_option("#task", "<GENERATE_TAGS>")  # another task captions the same image again
    expect(page.locator("#try-timing")).to_have_text(re.compile(r"^<GENERATE_TAGS> in "))
    assert page.inner_text("#try-caption") == native_caption(server, image, "<GENERATE_TAGS>")
    page.screenshot(path=str(shots / "try-it.png"), full_page=True)


DROP_FILE = """([data, name]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
    return transfer;
}"""


def test_try_it_takes_a_dropped_or_pasted_image(page: Page, server: str, data: GalleryData) -> None:
    page.goto("about:blank")
    page.goto(server + "/#try")
    page.wait_for_selector("body[data-ready=true]")
    page.select_option("#task", "<CAPTION>")
    for index, how in ((3, "drop"), (4, "paste")):
        image = data.root / f"img{index:02d}.png"
        transfer = page.evaluate_handle(
            DROP_FILE, [base64.b64encode(image.read_bytes()).decode(), image.name]
        )
        if how == "drop":
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        else:
            page.evaluate(
                "transfer => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer}))",
                transfer,
            )
        expected = native_caption(server, image, "<CAPTION>")
        expect(page.locator("#try-caption")).to_have_text(expected)


def test_gallery_pages_and_search(page: Page, server: str, data: GalleryData, shots: Path) -> None:
    open_gallery(page, server)
    assert card_names(page) == list(data.names[:3])
    assert page.inner_text("#page-info") == "page 1 of 3 · 7 images"
    page.screenshot(path=str(shots / "gallery.png"), full_page=True)
    page.click("#next")
    expect(page.locator("#page-info")).to_have_text(re.compile(r"^page 2 "))
    assert card_names(page) == list(data.names[3:6])
    for text, field, expected in (("sub/", "name", data.names[5:]), ("red cat", "caption", ("img00.png",)),
                                  ("tree, sky", "all", ("img02.png",)), ("sub/", "caption", ())):  # fmt: skip
        page.fill("#q", text)
        page.select_option("#field", field)
        page.click("#search button[type=submit]")
        # The click starts the load at once (data-gallery=loading), so "ready" means this search's
        # answer is drawn: the count alone could still be the previous search's.
        page.wait_for_selector("body[data-gallery=ready]")
        expect(page.locator("#page-info")).to_contain_text(f"· {len(expected)} images")
        assert card_names(page) == list(expected), (text, field)
    page.screenshot(path=str(shots / "gallery-search.png"), full_page=True)


def test_a_thumbnail_opens_the_whole_image(page: Page, server: str) -> None:
    open_gallery(page, server)
    card(page, "img02.png").locator("img.thumb").click()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-name")).to_have_text("img02.png")
    viewer_image = page.locator("#viewer-image")
    expect(viewer_image).to_have_attribute("src", re.compile(r"^blob:"))
    assert viewer_image.evaluate(
        "image => image.decode().then(() => [image.naturalWidth, image.naturalHeight])"
    ) == [48, 40]
    page.click("#viewer-close")
    expect(page.locator("#viewer")).to_be_hidden()


def test_editing_a_caption_writes_the_file(page: Page, server: str, data: GalleryData) -> None:
    open_gallery(page, server)
    page.click("#next")
    target = card(page, "img03.png")
    target.locator("textarea").fill("edited in the browser")
    target.locator("button.save").click()
    target.locator(".card-message", has_text="saved").wait_for()
    assert (data.root / "img03.txt").read_text(encoding="utf-8") == "edited in the browser"


def test_caption_markup_is_shown_as_text_and_runs_nothing(page: Page, server: str) -> None:
    open_gallery(page, server)
    target = card(page, "img01.png")
    assert target.locator("textarea").input_value() == XSS
    assert target.locator('.source[data-source=".tags"] .source-text').inner_text() == f"tags {XSS}"
    assert page.locator("img[src='x']").count() == 0
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_recaption_selected_updates_their_captions(page: Page, server: str, data: GalleryData) -> None:
    open_gallery(page, server)
    page.click("#select-none")
    page.click("#next")
    expect(page.locator("#page-info")).to_have_text(re.compile(r"^page 2 "))
    for path in ("img04.png", "sub/img05.png"):
        card(page, path).locator("input.pick").check()
    assert page.inner_text("#selected-count") == "2 selected"
    page.select_option("#gallery-task", "<CAPTION>")
    page.check("#recaption-save")
    page.click("#recaption")
    page.wait_for_selector("body[data-recaption=done]")
    assert page.inner_text("#gallery-message") == "captioned 2 of 2 with <CAPTION>"
    for path in ("img04.png", "sub/img05.png"):
        expected = native_caption(server, data.root / path, "<CAPTION>")
        shown = card(page, path)
        assert shown.locator('.source[data-source="<CAPTION>"] .source-text').inner_text() == expected
        assert shown.locator("textarea").input_value() == expected
        assert (data.root / path).with_suffix(".txt").read_text(encoding="utf-8") == expected
    assert card(page, "img03.png").locator('.source[data-source="<CAPTION>"]').count() == 0


def test_export_downloads_exactly_the_selected_rows(page: Page, server: str, data: GalleryData) -> None:
    open_gallery(page, server)
    page.click("#select-none")
    for path in ("img00.png", "img02.png"):
        card(page, path).locator("input.pick").check()
    page.click("#next")
    expect(page.locator("#page-info")).to_have_text(re.compile(r"^page 2 "))
    card(page, "img03.png").locator("input.pick").check()
    with page.expect_download() as download:
        page.click("#export")
    rows = [json.loads(line) for line in Path(download.value.path()).read_text(encoding="utf-8").splitlines()]
    assert [row["file_name"] for row in rows] == ["img00.png", "img02.png", "img03.png"]
    assert (
        rows[0]["caption"] == "a red cat on a sofa"
        and rows[0]["sources"]["jsonl <CAPTION>"] == "jsonl says cat"
    )
    assert rows[1]["sources"][".generate_tags.txt"] == "tree, sky"
    assert rows[2]["caption"] == (data.root / "img03.txt").read_text(encoding="utf-8")


def test_status_panel_is_live(page: Page, server: str, data: GalleryData, shots: Path) -> None:
    page.goto("about:blank")
    page.goto(server + "/#status")
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#st-jobs")).to_have_text(re.compile(r"^\d+$"))
    before = int(page.inner_text("#st-jobs"))
    native_caption(server, data.root / "sub" / "img06.png", "<ANALYZE>")
    expect(page.locator("#st-jobs")).not_to_have_text(str(before))  # updated without a reload
    assert int(page.inner_text("#st-jobs")) > before
    page.wait_for_selector("#batches tr")
    assert page.inner_text("#st-state") == "ready" and page.inner_text("#st-model") == "test:tiny"
    assert page.inner_text("#status-line").startswith("test:tiny ready · queue ")  # the header names it
    assert page.inner_text("#st-idle") == "never"  # the test server runs with --idle-timeout -1
    assert page.inner_text("#st-keep-alive") == "until unloaded by hand (set by the server)"
    assert re.fullmatch(r"[\d.]+ img/s", page.inner_text("#st-speed"))
    page.screenshot(path=str(shots / "status.png"), full_page=True)
