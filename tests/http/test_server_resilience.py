"""The server under clients that leave, requests that partly fail, a dying worker and a drain.

A real aiohttp server on a port with the fake captioner, whose delays make the timing known.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from PIL import Image

from tests.conftest import StartEngine
from tests.support.gated import GatedFake
from tests.support.images import dds_with_zeroed_pixel_format
from tests.support.serving import running_app
from vision_server import images
from vision_server.api.state import DECODER, ENGINE, UPLOADS
from vision_server.captioner import Caption, CaptionItem
from vision_server.engine.lifecycle import ModelState
from vision_server.errors import Draining
from vision_server.images import fit_image
from vision_server.settings import Settings
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


def png_b64(shade: int, size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def native(shade: int) -> dict[str, str]:
    return {"image": png_b64(shade), "prompt": "<CAPTION>"}


def chat(*image_texts: str) -> dict[str, Any]:
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{text}"}} for text in image_texts
    ]
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "<CAPTION>"}, *parts]}]}


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def post(session: ClientSession, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    async with session.post(path, json=body) as response:
        return response.status, dict(response.headers), await response.json()


def rejected(metrics_text: str, reason: str) -> float:
    match = re.search(rf'vision_server_requests_rejected_total\{{reason="{reason}"\}} (\S+)', metrics_text)
    assert match, f"no rejected series for {reason}"
    return float(match.group(1))


# --- clients that leave free their place at once ---------------------------------------


async def test_jobs_of_clients_that_left_leave_the_queue_at_once(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_queue=3)
    fake = GatedFake()  # the batch runs until the newcomers below have taken the leavers' places
    async with running_app(settings, fake) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        busy = asyncio.create_task(post(session, "/process_image", native(0)))
        await until(lambda: engine.status().jobs_running == 1)
        leavers = [asyncio.create_task(post(session, "/process_image", native(n))) for n in (1, 2, 3)]
        await until(lambda: engine.status().queue_depth == 3)
        for task in leavers:
            task.cancel()
        # At once: while the batch still runs, not when the worker would reach them.
        await until(lambda: engine.status().queue_depth == 0)
        assert engine.status().jobs_running == 1
        newcomers = [asyncio.create_task(post(session, "/process_image", native(n))) for n in (4, 5, 6)]
        await until(lambda: engine.status().queue_depth == 3)  # room for all three (max_queue 3)
        assert engine.status().jobs_running == 1 and not busy.done()
        async with session.get("/metrics") as response:
            assert rejected(await response.text(), "client_disconnected") == 3
        fake.gate.set()
        statuses = [status for status, _, _ in await asyncio.gather(busy, *newcomers)]
        assert statuses == [200, 200, 200, 200]


# --- a request with several images is all or nothing -----------------------------------


async def test_a_failed_multi_image_request_leaves_no_captions_behind(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1)
    fake = FakeCaptioner(delay=0.8)
    async with running_app(settings, fake) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        busy = asyncio.create_task(post(session, "/process_image", native(0)))
        await until(lambda: engine.status().jobs_running == 1)
        good = [png_b64(n) for n in range(1, 7)]
        status, _, body = await post(session, "/v1/chat/completions", chat(*good, "bm90IGFuIGltYWdl"))
        assert status == 400 and body["error"]["code"] == "invalid_image"
        assert (await busy)[0] == 200
        await asyncio.sleep(0.5)
        assert sum(fake.batch_sizes) == 1 and engine.status().queue_depth == 0  # only the busy job ran


async def test_images_per_request_are_capped(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_images_per_request=2)
    async with running_app(settings, FakeCaptioner()) as (_, url), ClientSession(url) as session:
        status, _, body = await post(session, "/v1/chat/completions", chat(*(png_b64(n) for n in range(3))))
        assert status == 400 and "the limit is 2 per request" in body["error"]["message"]
        status, _, body = await post(session, "/v1/chat/completions", chat(png_b64(1), png_b64(2)))
        assert status == 200, body


# --- the worker survives a bad batch, and is restarted if it dies ------------------------


class MiscountingFake(FakeCaptioner):
    """Returns one result too few for its first batch: the worker used to die on zip(strict=True)."""

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        results = super().caption(batch)
        return results[:-1] if len(self.batch_sizes) == 1 else results


async def test_the_worker_survives_a_captioner_that_miscounts(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, request_timeout=3)
    async with running_app(settings, MiscountingFake()) as (app, url), ClientSession(url) as session:
        status, _, body = await post(session, "/process_image", native(1))
        assert status == 500 and "request id" in body["detail"]
        assert app[ENGINE].running
        status, _, body = await post(session, "/process_image", native(2))
        assert status == 200, body


async def test_a_dead_worker_is_reported_refused_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1)
    async with running_app(settings, FakeCaptioner()) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        # Long enough that the three requests below surely fall in the dead time, on any CI machine.
        engine.config = dataclasses.replace(engine.config, worker_restart_delay=5.0)
        assert engine._worker is not None
        engine._worker.cancel()  # the worker catches every Exception; only this can still end it
        await until(lambda: engine.worker_down)
        async with session.get("/ready") as response:
            assert response.status == 503 and (await response.json())["reason"] == "worker_down"
        async with session.get("/health") as response:
            assert response.status == 503 and (await response.json())["worker"] == "down"
        started = time.monotonic()
        status, headers, _ = await post(session, "/process_image", native(1))
        # Refused at once, not held until the restart (5 s away) or the request timeout.
        assert status == 503 and "Retry-After" in headers and time.monotonic() - started < 2.5
        await until(lambda: engine.running, timeout=15.0)
        status, _, _ = await post(session, "/process_image", native(2))
        assert status == 200
        async with session.get("/ready") as response:
            assert response.status == 200
        async with session.get("/metrics") as response:  # for an alert: the worker is never meant to die
            assert re.search(r"^vision_server_worker_restarts_total 1\.0$", await response.text(), re.M)
        assert (
            "the captioning worker died" in caplog.text and "restarting the captioning worker" in caplog.text
        )


# --- a drain ends within the grace even while the model loads ---------------------------


async def test_a_drain_during_a_long_load_ends_within_the_grace(start_engine: StartEngine) -> None:
    engine = await start_engine(FakeCaptioner(load_delay=6.0))
    job = asyncio.create_task(
        engine.submit(CaptionItem(fit_image(Image.new("RGB", (4, 4)), FAKE_SPEC), "<CAPTION>"))
    )
    await until(lambda: engine.state is ModelState.LOADING)
    started = time.monotonic()
    clean = await engine.stop(grace=0.5)
    assert time.monotonic() - started < 0.5 + 3.0 + 1.0
    assert clean is False  # the model thread was left behind, still loading
    with pytest.raises(Draining):
        await job


# --- a request still being decoded when the server stops gets a 503 ---------------------


async def test_requests_in_the_decode_pool_during_a_drain_get_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = images.prepare_image

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "prepare_image", slow)
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, decode_threads=1)
    async with running_app(settings, FakeCaptioner()) as (app, url), ClientSession(url) as session:
        decoding = asyncio.create_task(post(session, "/process_image", native(1)))
        waiting = asyncio.create_task(post(session, "/process_image", native(2)))  # queued in the pool
        await asyncio.sleep(0.3)
        await app[ENGINE].stop(grace=5)
        app[DECODER].close()  # what the app's cleanup does once the drain is over
        for task in (decoding, waiting):
            status, headers, body = await task
            assert status == 503 and headers.get("Retry-After") == "5", body


# --- a drain cuts the request bodies still arriving short with a 503 ---------------------

ARRIVING_BODIES = [  # (path, content type, the first bytes of a 100000-byte body)
    ("/process_image", b"application/json", b'{"image": "iVBORw0KGgo'),
    ("/v1/chat/completions", b"application/json", b'{"messages": [{"role": "user", "content": ['),
    ("/caption", b"multipart/form-data; boundary=XyZ", b"--XyZ\r\n"),
]


async def test_a_drain_answers_the_bodies_still_arriving_503_at_once(tmp_path: Path) -> None:
    """Slow uploads would hold their connections until --body-timeout (an hour here); their jobs
    would be refused by the draining engine anyway. A body that starts after the cut is refused."""
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, body_timeout=3600)
    async with running_app(settings, FakeCaptioner()) as (app, url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        connections = []
        for path, content_type, start in ARRIVING_BODIES:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: ".encode()
                + content_type
                + b"\r\nContent-Length: 100000\r\n\r\n"
                + start
            )
            await writer.drain()
            connections.append((path, reader, writer))
        await until(lambda: len(app[UPLOADS]) == len(ARRIVING_BODIES), timeout=30)
        assert app[UPLOADS].cut_short() == len(ARRIVING_BODIES)  # what both drains call first
        for path, reader, writer in connections:  # read by length: aiohttp lingers ~10 s before EOF
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            writer.close()
            assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in head, (path, head)
            assert b"shutting down" in body, (path, body)
        assert len(app[UPLOADS]) == 0
        async with ClientSession(url) as session:
            status, headers, body = await post(session, "/process_image", native(1))
        assert status == 503 and headers.get("Retry-After") == "5" and "shutting down" in body["detail"]


# --- formats outside the documented list are a 400 that names them -----------------------


async def test_a_dds_upload_is_a_400_naming_the_accepted_formats(tmp_path: Path) -> None:

    settings = Settings(cache_dir=tmp_path, idle_timeout=-1)
    dds = base64.b64encode(dds_with_zeroed_pixel_format()).decode()
    async with running_app(settings, FakeCaptioner()) as (_, url), ClientSession(url) as session:
        status, _, body = await post(session, "/process_image", {"image": dds, "prompt": "<CAPTION>"})
        assert status == 400 and "PNG, JPEG, WebP, GIF, BMP or TIFF" in body["detail"]
