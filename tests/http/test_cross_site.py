"""A web page on another site cannot make a visitor's browser act on a keyless server (CSRF).

The requests are the ones a browser sends for ``fetch(url, {method: "POST", mode: "no-cors",
body: "..."})`` on a foreign page: a ``text/plain`` body needs no preflight, so before the
cross-site check such a POST saved caption files and unloaded the model on the loopback default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import ClientSession

from tests.support.gallery_data import GalleryData, make_gallery
from tests.support.serving import running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

EVIL = "https://evil.example"
SANCTIONED = "http://127.0.0.1:8000"  # SillyTavern's page, allowed with --cors-origin


def browser(site: str, origin: str = EVIL) -> dict[str, str]:
    """What a browser adds to a no-cors POST from a page at ``origin``."""
    return {
        "Origin": origin,
        "Sec-Fetch-Site": site,
        "Sec-Fetch-Mode": "no-cors",
        "Content-Type": "text/plain",
    }


@pytest.fixture
def data(tmp_path: Path) -> GalleryData:
    return make_gallery(tmp_path)


def settings_for(data: GalleryData, tmp_path: Path, **overrides: object) -> Settings:
    return Settings(
        cache_dir=tmp_path / "cache",
        gallery=data.root,
        gallery_writable=True,
        **overrides,  # type: ignore[arg-type]
    )


async def save(session: ClientSession, text: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    body = json.dumps({"path": "img00.png", "source": ".txt", "text": text})
    async with session.post("/ui/api/gallery/save", data=body, headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_foreign_page_cannot_save_captions_or_unload(
    data: GalleryData, tmp_path: Path, site: str
) -> None:
    async with (
        running_server(settings_for(data, tmp_path), FakeCaptioner()) as url,
        ClientSession(url) as session,
    ):
        status, reply = await save(session, "written by a web page", browser(site))
        assert status == 403 and EVIL in str(reply["error"]) and "--cors-origin" in str(reply["error"])
        assert (data.root / "img00.txt").read_text(encoding="utf-8") == "a red cat on a sofa"
        async with session.post("/v1/model/load", headers=browser(site)) as response:
            assert response.status == 403  # admin routes trust loopback, and the browser is on loopback
        async with session.post("/v1/chat/completions", data="{}", headers=browser(site)) as response:
            reply = await response.json()
            assert response.status == 403 and reply["error"]["code"] == "forbidden"  # the OpenAI shape
        async with session.get("/metrics") as response:
            assert 'vision_server_requests_rejected_total{reason="forbidden"} 3.0' in await response.text()


async def test_the_own_page_other_clients_and_allowed_origins_still_pass(
    data: GalleryData, tmp_path: Path
) -> None:
    settings = settings_for(data, tmp_path, cors_origins=(SANCTIONED,))
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as session:
        same_origin = browser("same-origin", origin=url)  # the server's own web page
        assert (await save(session, "from the web page", same_origin))[0] == 200
        assert (await save(session, "from curl", {}))[0] == 200  # no browser headers at all
        assert (await save(session, "from SillyTavern", browser("same-site", SANCTIONED)))[0] == 200
        assert (data.root / "img00.txt").read_text(encoding="utf-8") == "from SillyTavern"
        assert (await save(session, "from elsewhere", browser("cross-site")))[0] == 403
        page = {"Accept": "text/html", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        async with session.get("/", headers=page) as response:
            assert response.status == 200  # a link to the page from another site still opens it
