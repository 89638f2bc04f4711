"""Every reply names the server as a plain ``vision-server``: no aiohttp or Python version for a
scanner to match against published flaws, on successes, every family's errors and files alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from tests.support.gallery_data import make_gallery
from tests.support.images import b64
from tests.support.serving import running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

KEY = "s3cret-key"


async def test_every_reply_says_only_vision_server(tmp_path: Path) -> None:
    data = make_gallery(tmp_path)
    settings = Settings(cache_dir=tmp_path / "cache", api_key=KEY, gallery=data.root)
    keyed = {"Authorization": f"Bearer {KEY}"}
    # (method, path, headers, body keyword arguments, expected status)
    requests: list[tuple[str, str, dict[str, str], dict[str, Any], int]] = [
        ("POST", "/process_image", keyed, {"json": {"image": b64(3), "prompt": "<CAPTION>"}}, 200),
        ("POST", "/process_image", keyed, {"json": {"image": "not an image", "prompt": "<CAPTION>"}}, 400),
        ("POST", "/v1/chat/completions", keyed, {"data": "{"}, 400),
        ("GET", "/no/such/path", keyed, {}, 404),
        ("GET", "/v1/no-such-route", keyed, {}, 404),
        ("GET", "/health", {}, {}, 200),
        ("GET", "/metrics", keyed, {}, 200),
        ("GET", "/", {**keyed, "Accept": "text/html"}, {}, 200),
        ("GET", "/ui/app.js", keyed, {}, 200),
        ("GET", "/ui/api/gallery/image?path=img00.png", keyed, {}, 200),
        ("GET", "/ui/api/gallery/image?path=../outside.txt", keyed, {}, 404),
        ("GET", "/v1/status", {**keyed, "Host": "evil.example"}, {}, 403),
        ("GET", "/v1/status", {}, {}, 401),
    ]
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as session:
        for method, path, headers, body, status in requests:
            async with session.request(method, path, headers=headers, **body) as response:
                await response.read()
                assert response.status == status, (method, path, await response.text())
                assert response.headers.getall("Server") == ["vision-server"], (method, path)
