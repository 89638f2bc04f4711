"""The web page of a server started with ``--api-key`` and a read-only gallery, in a real browser:
the page asks for the key and works once it is given; saving is refused with a message on the
page; the gallery routes of the real process answer 404 to paths that leave the root.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.browser import browser_tab, page_server, screenshot_dir
from tests.support.gallery_data import GalleryData, make_gallery

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import expect

if TYPE_CHECKING:
    from playwright.sync_api import Page

KEY = "browser-test-key"
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> GalleryData:
    return make_gallery(tmp_path_factory.mktemp("web-ui-secured-data"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data: GalleryData) -> Iterator[str]:
    with page_server(
        tmp_path_factory, "web-ui-secured", "--gallery", str(data.root), "--api-key", KEY
    ) as url:
        yield url


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Page]:
    with browser_tab(TIMEOUT_MS) as tab:
        yield tab


def test_the_page_asks_for_the_key_and_works_once_given(
    page: Page, server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = screenshot_dir(tmp_path_factory)
    page.goto(server + "/#gallery")
    expect(page.locator("#key-panel")).to_be_visible()
    assert page.locator("#page-gallery").is_hidden() and page.locator("#page-try").is_hidden()
    expect(page.get_by_role("tablist")).to_be_hidden()  # no tabs without panels to show
    page.screenshot(path=str(shots / "api-key.png"), full_page=True)
    page.fill("#key-input", "a wrong key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("Invalid API key")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    assert page.locator("#key-panel").is_hidden()
    assert page.locator(".card").count() == 7  # the default page size holds them all
    expect(page.locator("#gallery-mode")).to_have_text("read-only")
    page.reload()  # the key stays for this tab: no second prompt
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    assert page.locator("#key-panel").is_hidden()


def test_read_only_gallery_refuses_a_save_with_a_message(
    page: Page, server: str, data: GalleryData, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page.goto(server + "/#gallery")
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    target = page.locator('.card[data-path="img00.png"]')
    target.locator("textarea").fill("this must not be written")
    target.locator("button.save").click()
    message = page.get_by_role("alert").filter(has_text="img00.png: ")  # not saved: read out at once
    expect(message).to_contain_text("read-only")
    expect(message).to_contain_text("--gallery-writable")
    expect(target.locator(".card-error")).to_contain_text("--gallery-writable")  # and shown on its card
    assert (data.root / "img00.txt").read_text(encoding="utf-8") == "a red cat on a sofa"
    page.screenshot(path=str(screenshot_dir(tmp_path_factory) / "gallery-read-only.png"), full_page=True)


def test_tab_from_the_shown_tab_goes_into_its_panel_past_forget_key(page: Page, server: str) -> None:
    """The tabs sit right above their panels (WAI-ARIA tabs pattern): Forget key, shown once a
    key is kept, is no stop between a tab and its panel."""
    page.goto(server + "/#gallery")
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    expect(page.get_by_role("button", name="Forget key")).to_be_visible()
    page.get_by_role("tab", name="Gallery").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "page-gallery"


@pytest.mark.parametrize(
    "query", ["path=..%2Fsecret.png", "path=%2Fetc%2Fpasswd", "path=escape.png", "path=up%2Fsecret.png"]
)
def test_gallery_routes_of_the_process_refuse_paths_out_of_the_root(server: str, query: str) -> None:
    for route in ("thumb", "image"):
        request = urllib.request.Request(
            f"{server}/ui/api/gallery/{route}?{query}", headers={"Authorization": f"Bearer {KEY}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 404, (route, query)


def test_no_file_outside_was_touched(data: GalleryData) -> None:
    assert data.outside.read_text(encoding="utf-8") == "outside the gallery"
    assert sorted(p.name for p in Path(data.root).parent.iterdir()) == [
        "captions.jsonl", "dataset", "secret.png", "secret.txt"
    ]  # fmt: skip
