"""The gallery of a dataset unpacked from an old archive, in a real browser against a real server
with the tiny model: an image whose file name is not UTF-8 (Latin-1 ``café.png``, which Python
holds as a lone surrogate) shows its name readably, its thumbnail and full image load, and its
caption is saved into its own caption file. The page used to build the image URLs with
``encodeURIComponent``, which throws on lone surrogates, so none of it worked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.browser import browser_tab, page_server
from tests.support.images import image_bytes

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
from playwright.sync_api import expect

if TYPE_CHECKING:
    from playwright.sync_api import Page

TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)
ODD = b"caf\xe9"  # Latin-1, not UTF-8
SHOWN = "caf\\xe9.png"  # as every report of the project prints such a name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("web-ui-odd-names") / "dataset"
    folder.mkdir()
    try:
        (folder / os.fsdecode(ODD + b".png")).write_bytes(image_bytes(1))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    (folder / "fine image.png").write_bytes(image_bytes(2))
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Page]:
    with (
        page_server(tmp_path_factory, "web-ui-odd", "--gallery", str(root), "--gallery-writable") as url,
        browser_tab(TIMEOUT_MS) as tab,
    ):
        tab.goto(f"{url}/#gallery")
        tab.wait_for_selector("body[data-ready=true][data-gallery=ready]")
        yield tab


def test_a_name_that_is_not_utf8_shows_loads_and_saves(page: Page, root: Path) -> None:
    expect(page.locator(".card .name")).to_have_text([SHOWN, "fine image.png"])
    for name in (SHOWN, "fine image.png"):  # the thumbnail came (a blob), for both
        thumb = page.get_by_role("button", name=f"Show {name} full size").locator(".thumb")
        expect(thumb).to_have_attribute("src", re.compile(r"^blob:"))
    expect(page.locator(".thumb.broken")).to_have_count(0)

    page.get_by_role("button", name=f"Show {SHOWN} full size").click()
    expect(page.get_by_role("dialog", name=SHOWN)).to_be_visible()
    expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"^blob:"))
    expect(page.locator("#viewer-error")).to_have_text("")
    page.keyboard.press("Escape")

    page.get_by_role("textbox", name=f"caption of {SHOWN}").fill("a cup of coffee")
    page.get_by_role("button", name=f"Save caption of {SHOWN}").click()
    card = page.locator(".card").filter(has_text=SHOWN)
    expect(card.locator(".card-message")).to_have_text("saved")
    assert (root / os.fsdecode(ODD + b".txt")).read_text(encoding="utf-8") == "a cup of coffee"
    assert sorted(os.listdir(os.fsencode(root))) == [ODD + b".png", ODD + b".txt", b"fine image.png"]
