"""keep_alive over HTTP: native body, OpenAI extra field, multipart form field, the cap, X-Keep-Alive."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from aiohttp import ClientSession, FormData

from tests.support.api import engine_status
from tests.support.images import b64, image_bytes
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner


def chat(seed: int, **extra: object) -> dict[str, object]:
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(seed)}"}}
    return {"messages": [{"role": "user", "content": [part]}], **extra}


async def native(session: ClientSession, keep_alive: object) -> tuple[int, str | None, dict[str, object]]:
    body = {"image": b64(1), "prompt": "<CAPTION>", "keep_alive": keep_alive}
    async with session.post("/process_image", json=body) as response:
        return response.status, response.headers.get("X-Keep-Alive"), await response.json()


async def test_keep_alive_in_every_family(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=300, max_keep_alive=3600)
    async with client_for(settings, FakeCaptioner()) as session:
        status, granted, _ = await native(session, "10m")
        assert (status, granted) == (200, "600")
        state = await engine_status(session)
        assert (state["keep_alive"], state["keep_alive_from"]) == (600, "request")
        assert 590 < state["expires_at"] - time.time() <= 600

        status, granted, _ = await native(session, "3h")  # above the cap: the cap
        assert (status, granted) == (200, "3600")

        async with session.post("/v1/chat/completions", json=chat(2, keep_alive=45)) as response:
            assert response.status == 200 and response.headers["X-Keep-Alive"] == "45"
        assert (await engine_status(session))["keep_alive"] == 45

        form = FormData()
        form.add_field("image", image_bytes(3), filename="a.png", content_type="image/png")
        form.add_field("keep_alive", "1h30m")
        async with session.post("/caption", data=form) as response:
            assert response.status == 200 and response.headers["X-Keep-Alive"] == "3600"

        async with session.post("/process_image", json={"image": b64(4), "prompt": "<CAPTION>"}) as response:
            assert response.status == 200 and "X-Keep-Alive" not in response.headers
        assert (await engine_status(session))["keep_alive"] == 3600  # unchanged by a request without one

        status, granted, body = await native(session, -1)  # forever, above the cap
        assert status == 400 and granted is None and "--max-keep-alive" in str(body["detail"])
        status, _, body = await native(session, "tomorrow")
        assert status == 400 and "'10m'" in str(body["detail"])
        async with session.post("/v1/chat/completions", json=chat(5, keep_alive=[1])) as response:
            error = (await response.json())["error"]
            assert response.status == 400 and error["param"] == "keep_alive"

        status, granted, _ = await native(session, 0)  # unload once this batch is done
        assert (status, granted) == (200, "0")
        for _ in range(200):
            if (await engine_status(session))["state"] == "unloaded":
                break
            await asyncio.sleep(0.01)
        assert (await engine_status(session))["state"] == "unloaded"


async def test_a_malformed_keep_alive_suggests_only_values_the_server_accepts(tmp_path: Path) -> None:
    """The default cap (the idle timeout) refuses -1, so the 400 must not offer it."""
    capped = Settings(cache_dir=tmp_path, idle_timeout=300)
    uncapped = Settings(cache_dir=tmp_path, idle_timeout=300, max_keep_alive=-1)
    for settings, forever in ((capped, False), (uncapped, True)):
        async with client_for(settings, FakeCaptioner()) as session:
            status, _, body = await native(session, "tomorrow")
            message = str(body["detail"])
            suggested = {"300", *re.findall(r"'([^']*)'", message)} - {"keep_alive", "tomorrow"}
            assert status == 400 and "seconds (300)" in message and "10m" in suggested, message
            assert ("-1" in suggested) is forever, message
            for value in sorted(suggested):
                status, granted, body = await native(session, value)
                assert status == 200 and granted is not None, (message, value, body)


async def test_without_a_cap_forever_is_granted(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=300, max_keep_alive=-1)
    async with client_for(settings, FakeCaptioner()) as session:
        status, granted, _ = await native(session, "-1m")
        assert (status, granted) == (200, "-60")
        state = await engine_status(session)
        assert state["keep_alive"] == -60 and state["expires_at"] is None
