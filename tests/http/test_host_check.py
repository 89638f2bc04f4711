"""A web page that rebinds its own name to 127.0.0.1 (DNS rebinding) cannot read or write a keyless
loopback server; every way the server is meant to be reached keeps working.

The rebound browser's requests are same-origin, so they carry no cross-site marks: the one thing
that gives them away is ``Host: evil.example:PORT``, which is what these tests send.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from tests.support.gallery_data import GalleryData, make_gallery
from tests.support.images import image_bytes, shade_b64
from tests.support.serving import running_server
from vision_server.app import create_app
from vision_server.client.api import AsyncVisionClient
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

EVIL = "evil.example"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def rebound(url: str, **headers: str) -> dict[str, str]:
    """What a browser sends for a same-origin fetch from a page at ``http://evil.example:PORT``
    once that name points at 127.0.0.1."""
    return {"Host": f"{EVIL}:{port_of(url)}", "Sec-Fetch-Site": "same-origin", **headers}


def settings_for(tmp_path: Path, data: GalleryData | None = None, **overrides: object) -> Settings:
    gallery = {"gallery": data.root, "gallery_writable": True} if data is not None else {}
    return Settings(cache_dir=tmp_path / "cache", **gallery, **overrides)  # type: ignore[arg-type]


async def test_a_rebound_page_reads_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vision_server")
    data = make_gallery(tmp_path)
    async with (
        running_server(settings_for(tmp_path, data), FakeCaptioner()) as url,
        ClientSession(url) as session,
    ):
        async with session.get("/v1/status", headers=rebound(url)) as response:
            reply = await response.json()
            assert response.status == 403 and reply["error"]["code"] == "forbidden"
            message = reply["error"]["message"]
            assert f"'{EVIL}:{port_of(url)}'" in message and f"--allowed-host {EVIL}." in message
        async with session.get("/ui/api/gallery/image?path=img00.png", headers=rebound(url)) as response:
            assert response.status == 403 and "image" not in response.content_type
        async with session.get("/ui/api/gallery", headers=rebound(url)) as response:
            assert response.status == 403 and "a red cat" not in await response.text()
        body = json.dumps({"path": "img00.png", "source": ".txt", "text": "written by a web page"})
        async with session.post("/ui/api/gallery/save", data=body, headers=rebound(url)) as response:
            assert response.status == 403
        assert (data.root / "img00.txt").read_text(encoding="utf-8") == "a red cat on a sofa"
        caption = {"image": shade_b64(9), "prompt": "<CAPTION>"}
        async with session.post("/process_image", json=caption, headers=rebound(url)) as response:
            reply = await response.json()
            assert response.status == 403 and "--allowed-host" in reply["detail"]  # the native shape
        async with session.post("/v1/chat/completions", data="{}", headers=rebound(url)) as response:
            reply = await response.json()
            assert response.status == 403 and reply["error"]["code"] == "forbidden"  # the OpenAI shape
        async with session.get("/", headers=rebound(url, Accept="text/html")) as response:
            assert response.status == 403 and "<html" not in (await response.text()).lower()
        async with session.get("/metrics") as response:
            assert 'vision_server_requests_rejected_total{reason="forbidden"} 7.0' in await response.text()
        logged = [r.getMessage() for r in caplog.records if "Refused a request for host" in r.getMessage()]
        assert len(logged) == 1 and "GET /v1/status: " in logged[0]  # once per name, for the operator
        assert f"--allowed-host {EVIL}." in logged[0]
        # The same requests as the server's own page sends them, under its own names, pass.
        for host in (f"127.0.0.1:{port_of(url)}", f"localhost:{port_of(url)}", f"[::1]:{port_of(url)}"):
            own = {"Host": host, "Sec-Fetch-Site": "same-origin"}
            async with session.get("/ui/api/gallery/image?path=img00.png", headers=own) as response:
                assert response.status == 200 and response.content_type == "image/png"
            async with session.get("/", headers={**own, "Accept": "text/html"}) as response:
                assert response.status == 200 and "<html" in (await response.text()).lower()
            saved = body.replace("web page", host)
            async with session.post("/ui/api/gallery/save", data=saved, headers=own) as response:
                assert response.status == 200
        written = (data.root / "img00.txt").read_text(encoding="utf-8")
        assert written == f"written by a [::1]:{port_of(url)}"


async def test_probes_answer_any_host(tmp_path: Path) -> None:
    """A probe may name the machine or a pod address; /health and /ready tell a page nothing."""
    async with running_server(settings_for(tmp_path), FakeCaptioner()) as url, ClientSession(url) as session:
        for path in ("/health", "/ready"):
            async with session.get(path, headers={"Host": "node7.cluster.internal"}) as response:
                assert response.status == 200, path
        async with session.get("/metrics", headers={"Host": "node7.cluster.internal"}) as response:
            assert response.status == 403


async def test_clients_by_address_and_localhost(tmp_path: Path) -> None:
    """curl-like and Python clients to 127.0.0.1 and localhost, with the Host they really send."""
    async with running_server(settings_for(tmp_path), FakeCaptioner()) as url:
        for base in (url, url.replace("127.0.0.1", "localhost")):
            async with AsyncVisionClient(base, retries=0) as client:
                assert await client.caption(image_bytes(3), "<CAPTION>")
                assert (await client.status())["state"]
            async with ClientSession() as session, session.get(f"{base}/v1/status") as response:
                assert response.status == 200


async def test_named_hosts_and_a_local_reverse_proxy(tmp_path: Path) -> None:
    """Caddy or HAProxy on this machine forward the public name from 127.0.0.1: refused, with the
    flag that fixes it, even from a --trusted-proxy; allowed once --allowed-host names it."""
    forwarded = {"Host": "vision.example.com", "X-Forwarded-For": "203.0.113.7"}
    trusting = settings_for(tmp_path, trusted_proxies=("127.0.0.1",))
    async with running_server(trusting, FakeCaptioner()) as url, ClientSession(url) as session:
        async with session.get("/v1/status", headers=forwarded) as response:
            reply = await response.json()
            assert response.status == 403
            assert "--allowed-host vision.example.com." in reply["error"]["message"]
    allowing = settings_for(tmp_path, trusted_proxies=("127.0.0.1",), allowed_hosts=(".example.com",))
    async with running_server(allowing, FakeCaptioner()) as url, ClientSession(url) as session:
        for host in ("vision.example.com", "example.com:443", "localhost"):
            async with session.get("/v1/status", headers={**forwarded, "Host": host}) as response:
                assert response.status == 200, host
        async with session.get("/v1/status", headers={"Host": "example.org"}) as response:
            assert response.status == 403


@pytest.mark.parametrize(
    ("overrides", "evil_passes"),
    [
        ({"host": "0.0.0.0"}, True),  # a network service: nothing changes without --allowed-host
        ({"host": "0.0.0.0", "allowed_hosts": ("vision.lan",)}, False),
        ({"allowed_hosts": ("*",)}, True),
    ],
)
async def test_when_the_check_is_on(tmp_path: Path, overrides: dict[str, Any], evil_passes: bool) -> None:
    # running_server always binds 127.0.0.1; the check follows the configured --host.
    async with (
        running_server(settings_for(tmp_path, **overrides), FakeCaptioner()) as url,
        ClientSession(url) as session,
    ):
        async with session.get("/v1/status", headers=rebound(url)) as response:
            assert (response.status == 200) is evil_passes
        async with session.get("/v1/status", headers={"Host": "vision.lan"}) as response:
            assert response.status == 200


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_server_on_ipv6_loopback(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path, host="::1"), FakeCaptioner())
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "::1", 0).start()
        url = f"http://[::1]:{runner.addresses[0][1]}"
        async with ClientSession(url) as session:
            async with session.get("/v1/status") as response:  # Host: [::1]:PORT
                assert response.status == 200
            async with session.get("/v1/status", headers=rebound(url)) as response:
                assert response.status == 403
    finally:
        await runner.cleanup()
