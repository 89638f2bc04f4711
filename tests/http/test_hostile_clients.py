"""What a hostile or careless client sent that still reached a 500, against the real tiny model.

Each of these was found by throwing odd requests at ``vision-server serve --model test:tiny``:

- a ``keep_alive`` integer too big for a float (``9`` x 400): an OverflowError;
- a ``temperature`` above 0 but below float32's range (``1e-40``): the model's scores divided by
  it became infinite and ``generate`` failed the batch;
- a body whose ``Content-Encoding`` (gzip, deflate) does not match its bytes: aiohttp's payload
  error reached the handler, and aiohttp then logged the same error again, with a traceback, when
  it tried to read the rest of the body after the reply;
- a lone surrogate (a JSON ``"\\ud800"`` escape without its pair) saved as a gallery caption (a
  UTF-8 file cannot hold it), or echoed into a streamed Responses event (the stream broke after
  its 200, with a 500 written into it);
- a client that left a streamed request for several images while they were captioned: the late
  reply to a closed connection was logged as an unhandled error, counted as a 500;
- a TIFF whose one tile is far larger than the image (64x64 pixels in a 4096x262144 tile): the
  tile is decoded whole, past a pixel check that saw 4096 pixels (1 MB took 1 GB);
- a progressive JPEG of thousands of near-empty scans: each is one more pass over the whole
  image, so a 1 MB file of 100,000 over 8000x8000 pixels held a decode thread (and the whole
  decode budget) for minutes; it is now a 400 before any pixel is decoded.
- gzip that ends early: aiohttp passes on what it could inflate without a word, and the client
  that sent a body was told "The request body is empty" (cut in the gzip header), or that it was
  not valid JSON or a malformed form (cut later);
- a client that left a stream after its 200 (or, served without handler cancellation, any
  request): logged and counted as 200 where a hang-up is a 499; so was one that left a gallery
  file or export halfway through its download.

Every one must now be a 4xx in its family's shape (or, for the client that left, a 499 in the
log and metrics, never a 5xx), with no traceback in the log, and the server must answer the next
request.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import io
import json
import logging
import os
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, FormData, web
from PIL import Image
from yarl import URL

from tests.support.api import tiny_settings
from tests.support.images import b64, data_url, image_bytes, save
from tests.support.serving import running_app, running_server
from vision_server.api.state import ENGINE, UPLOADS
from vision_server.app import create_app
from vision_server.captioner import Caption, CaptionItem
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.settings import Settings

HUGE = "9" * 400
SCANS = 5000  # refinement scans after the first: 5001 in all


def message_of(path: str, body: dict[str, Any]) -> str:
    """The error message, read from the route family's own error shape."""
    if path.startswith(("/v1/", "/ui/")):
        return str(body["error"]["message"])
    if path == "/api/caption":
        return str(body["error"])
    return str(body["detail"])


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.exc_info]


def chat(images: int = 1, url: str | None = None, **extra: Any) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": url or data_url(seed)}} for seed in range(images)]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def responses(url: str | None = None, **extra: Any) -> dict[str, Any]:
    image = {"type": "input_image", "image_url": url or data_url(1)}
    return {"model": "m", "input": [{"role": "user", "content": [image]}], **extra}


def json_bodies(jpeg: str | None = None, **extra: Any) -> dict[str, dict[str, Any]]:
    """A request of every JSON family, with ``extra`` fields; ``jpeg`` (base64) is the image
    instead of a good PNG."""
    url = None if jpeg is None else f"data:image/jpeg;base64,{jpeg}"
    return {
        "/process_image": {"image": jpeg or b64(1), "prompt": "<CAPTION>", **extra},
        "/api/caption": {"image": url or b64(1), **extra},
        "/v1/chat/completions": chat(url=url, **extra),
        "/v1/responses": responses(url=url, **extra),
    }


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory, max_new_tokens=8)


# --- keep_alive ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", ["", "-"])
async def test_a_400_digit_keep_alive_is_a_400_naming_the_field(
    tiny_short: Settings, sign: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies().items():
            raw = json.dumps(body)[:-1] + f', "keep_alive": {sign}{HUGE}}}'
            headers = {"Content-Type": "application/json"}
            async with session.post(path, data=raw, headers=headers) as response:
                assert response.status == 400, (path, await response.text())
                message = message_of(path, await response.json())
                assert "'keep_alive' must be" in message and len(message) < 300, (path, message)
    assert not tracebacks(caplog)


# --- a temperature too small for float32 -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
async def test_a_temperature_below_float32_range_still_samples(
    tiny_short: Settings, temperature: float, caplog: pytest.LogCaptureFixture
) -> None:
    """It is > 0, so it samples (at a floor where the scores stay finite), in every family."""
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for stream in (False, True):
            body = chat(temperature=temperature, stream=stream)
            async with session.post("/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                text = await response.text()
            assert '"error"' not in text and "finish_reason" in text, text
        async with session.post("/v1/responses", json=responses(temperature=temperature)) as response:
            assert response.status == 200, await response.text()
        form = FormData({"temperature": str(temperature)})
        form.add_field("image", image_bytes(1), filename="1.png")
        async with session.post("/caption", data=form) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["caption"]
    assert not tracebacks(caplog)


# --- a body that is not what its Content-Encoding says -------------------------------------------


def form_body() -> bytes:
    """A multipart form of one image, boundary ``B``."""
    return (
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + image_bytes(1)
        + b"\r\n--B--\r\n"
    )


def bodies_of_every_kind() -> dict[str, tuple[bytes, str]]:
    """A JSON body for each JSON family and a form for the multipart ones, with its content type."""
    kinds = {path: (json.dumps(body).encode(), "application/json") for path, body in json_bodies().items()}
    form = (form_body(), "multipart/form-data; boundary=B")
    return {**kinds, "/caption": form, "/batch_caption": form}


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_its_content_encoding_is_a_400(
    tiny_short: Settings, tmp_path: Path, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vision_server.access")
    gallery = tmp_path / "gallery"
    save(gallery / "a.png", 3)
    settings = dataclasses.replace(tiny_short, gallery=gallery, gallery_writable=True)
    bodies = bodies_of_every_kind()
    bodies["/ui/api/gallery/save"] = (json.dumps({"path": "a.png", "text": "x"}).encode(), "application/json")
    async with running_server(settings) as url:
        for path, (payload, content_type) in bodies.items():
            # a connection of its own each time: the server closes a connection whose body it refused
            async with ClientSession(url) as session:
                headers = {"Content-Type": content_type, "Content-Encoding": encoding}
                async with session.post(path, data=payload, headers=headers) as response:
                    assert response.status == 400, (path, await response.text())
                    message = message_of(path, await response.json())
            assert f"Content-Encoding: {encoding}" in message and "uncompressed" in message, message
        assert (gallery / "a.txt").exists() is False  # nothing was saved from the unreadable body
        async with ClientSession(url) as session:
            async with session.post("/process_image", json=json_bodies()["/process_image"]) as response:
                assert response.status == 200
    await asyncio.sleep(0)  # let aiohttp finish with the refused connections before the log is read
    assert not tracebacks(caplog), tracebacks(caplog)
    statuses = {r.status for r in caplog.records if r.name == "vision_server.access"}  # type: ignore[attr-defined]
    assert statuses == {200, 400}, statuses  # a connection the server closes after its reply: no 499


def gzip_cuts(packed: bytes) -> dict[str, bytes]:
    """``packed`` (gzip) cut in its header, mid-data, and with only its trailer (CRC32 and size)
    or its size missing, and whole but with a wrong checksum."""
    wrong_crc = packed[:-8] + bytes(b ^ 0xFF for b in packed[-8:-4]) + packed[-4:]
    return {
        "in the header": packed[:12],
        "mid-data": packed[: len(packed) // 2],
        "no trailer": packed[:-8],
        "no size": packed[:-4],
        "wrong checksum": wrong_crc,
    }


@pytest.mark.parametrize("path", list(bodies_of_every_kind()))
async def test_a_gzip_body_that_ends_early_says_so_wherever_it_is_cut(
    tiny_short: Settings, path: str
) -> None:
    """aiohttp passed on what it could inflate of gzip that ends early, without a word: nothing
    for a stream cut in its header (answered "The request body is empty"), the first part of the
    body for one cut later (answered "not valid JSON" or "Malformed multipart body"), and the
    whole body for one that lacked only its trailer (accepted, with no check of its CRC32 or
    size). Every cut is now the same 400 naming the header, in every family, and a wrong
    checksum a 400 that says the body is not valid gzip."""
    payload, content_type = bodies_of_every_kind()[path]
    packed = gzip.compress(payload)
    messages = {}
    async with running_server(tiny_short) as url:
        for where, cut in gzip_cuts(packed).items():
            async with ClientSession(url) as session:
                headers = {"Content-Type": content_type, "Content-Encoding": "gzip"}
                async with session.post(path, data=cut, headers=headers) as response:
                    assert response.status == 400, (where, await response.text())
                    messages[where] = message_of(path, await response.json())
        async with ClientSession(url) as session:  # the same body whole: read as usual
            headers = {"Content-Type": content_type, "Content-Encoding": "gzip"}
            async with session.post(path, data=packed, headers=headers) as response:
                assert response.status == 200, await response.text()
            headers = {"Content-Type": content_type}  # cut, uncompressed: the format's own words
            async with session.post(path, data=payload[: len(payload) // 2], headers=headers) as response:
                assert response.status == 400
                plain = message_of(path, await response.json())
    crc = messages.pop("wrong checksum")
    assert "not valid gzip" in crc and "Content-Encoding: gzip" in crc and "uncompressed" in crc, crc
    assert len(set(messages.values())) == 1, messages  # the same words wherever it was cut
    message = messages["no trailer"]
    assert "Content-Encoding: gzip" in message and "not complete gzip" in message, message
    assert "gzip" not in plain and ("not valid JSON" in plain or "Malformed multipart" in plain), plain


async def test_a_cut_gzip_urlencoded_form_is_told_apart_from_a_whole_one(tiny_short: Settings) -> None:
    """A urlencoded form cut short read as a shorter form: its first fields, then the route's
    own complaint (no image here), with no word of gzip."""
    packed = gzip.compress(b"prompt=%3CCAPTION%3E&" + b"note=" + b"x" * 4000)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"}
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        async with session.post("/caption", data=packed, headers=headers) as response:
            assert response.status == 400, await response.text()
            whole = (await response.json())["detail"]
        async with session.post("/caption", data=packed[:-8], headers=headers) as response:
            assert response.status == 400, await response.text()
            cut = (await response.json())["detail"]
    assert "gzip" not in whole, whole
    assert "not complete gzip" in cut and "Content-Encoding: gzip" in cut, cut


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip"])
async def test_a_content_encoding_the_server_does_not_decode_is_a_415_in_every_family(
    tiny_short: Settings, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``br`` and ``zstd`` (no decoder installed) got aiohttp's own plain-text 400, before any
    middleware: no family shape, no access line, no metric. Any coding the server does not decode
    is now a 415 in the route's shape that says which it does (also in ``Accept-Encoding``),
    logged and counted like every other reply."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    bodies = bodies_of_every_kind()
    async with running_server(tiny_short) as url:
        for path, (payload, content_type) in bodies.items():
            async with ClientSession(url) as session:
                headers = {"Content-Type": content_type, "Content-Encoding": encoding}
                async with session.post(path, data=payload, headers=headers) as response:
                    assert response.status == 415, (path, await response.text())
                    assert response.headers["Accept-Encoding"] == "gzip, deflate"
                    message = message_of(path, await response.json())
            assert f"Content-Encoding {encoding}" in message and "send the body compressed" in message, (
                message
            )
            assert "gzip or deflate, or uncompressed without the header" in message, message
        async with ClientSession(url) as session:
            async with session.get("/metrics") as response:
                metrics = await response.text()
    access = [r for r in caplog.records if r.name == "vision_server.access"]
    assert sorted(r.status for r in access) == [415] * len(bodies), [r.getMessage() for r in access]  # type: ignore[attr-defined]
    assert all(r.error == "unsupported_encoding" for r in access), [r.getMessage() for r in access]  # type: ignore[attr-defined]
    assert (
        'vision_server_request_duration_seconds_count{route="openai.chat_completions",status="415"} 1.0'
        in metrics
    )
    assert (
        'vision_server_request_duration_seconds_count{route="multipart.caption",status="415"} 1.0' in metrics
    )
    assert not tracebacks(caplog), tracebacks(caplog)


@pytest.mark.parametrize("encoding", ["x-gzip", "GZIP", "identity, gzip"])
async def test_gzip_under_its_other_spellings_is_read(tiny_short: Settings, encoding: str) -> None:
    """Codings are case-insensitive, ``x-gzip`` is gzip (RFC 9110), ``identity`` changes nothing."""
    body = gzip.compress(json.dumps(json_bodies()["/process_image"]).encode())
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        async with session.post("/process_image", data=body, headers=headers) as response:
            assert response.status == 200, await response.text()


async def test_a_body_that_inflates_past_the_limit_is_a_413(tiny_short: Settings) -> None:
    """10 KB of gzip that inflate to 11 MB, against a 1 MB limit: refused as it grows."""
    settings = dataclasses.replace(tiny_short, max_request_bytes=1024 * 1024)
    bomb = gzip.compress(b'{"image": "' + b"A" * 11_000_000 + b'"}')
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with running_server(settings) as url, ClientSession(url) as session:
        async with session.post("/v1/chat/completions", data=bomb, headers=headers) as response:
            assert response.status == 413, await response.text()
            message = (await response.json())["error"]["message"]
    assert "decompresses to more than the limit of 1048576 bytes" in message, message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/caption", "/caption"])
async def test_deflate_cut_short_in_the_packet_of_its_headers_is_a_400_in_the_family_shape(
    tiny_short: Settings, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp refused it in its parser, before any handler: a plain-text 400 ("Can not decode
    content-encoding: deflate"), no access line, no metric. It is now the 400 of any compressed
    body that ends early, in the route's shape, logged."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    payload, content_type = bodies_of_every_kind()[path]
    packed = zlib.compress(payload)[:-3]
    async with running_app(tiny_short) as (_, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", URL(url).port)
        writer.write(  # one write: headers and body in one packet
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n".encode()
            + f"Content-Encoding: deflate\r\nContent-Length: {len(packed)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + packed
        )
        await writer.drain()
        reply = await reader.read()
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, reply
    message = message_of(path, json.loads(body))
    assert "Content-Encoding: deflate" in message and "not complete deflate" in message, message
    access = [r for r in caplog.records if r.name == "vision_server.access"]
    assert [(r.path, r.status) for r in access] == [(path, 400)], [r.getMessage() for r in access]  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/caption"])
async def test_deflate_that_ends_early_after_its_headers_is_a_400_not_a_wait_for_the_timeout(
    tiny_short: Settings, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp refused deflate that ends early when the message completed, out of its parser and
    not into the body: a body that came after its headers never ended, and the client waited
    for ``--body-timeout`` to be told its upload "stalled" (a 408). It is now the 400 of any
    compressed body that ends early, at once; the body was read whole, so the connection goes on
    to serve the next request."""
    payload, content_type = bodies_of_every_kind()[path]
    packed = zlib.compress(payload)[:-3]  # all but the end of the stream and its checksum
    settings = dataclasses.replace(tiny_short, body_timeout=60)
    async with running_app(settings) as (app, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", URL(url).port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n".encode()
            + f"Content-Encoding: deflate\r\nContent-Length: {len(packed)}\r\n\r\n".encode()
            + packed[:100]
        )
        await writer.drain()
        while not len(app[UPLOADS]):  # the handler is reading the body
            await asyncio.sleep(0.01)
        writer.write(packed[100:])
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        good = json.dumps(json_bodies()["/process_image"]).encode()
        writer.write(
            b"POST /process_image HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(good)}\r\nConnection: close\r\n\r\n".encode()
            + good
        )
        next_reply = await reader.read()  # the same connection, up to the server's close
        writer.close()
        # 15 MB that deflate to 15 KB: under the 20 MB limit, read as usual
        whole = json.dumps(chat(x="a" * 15_000_000)).encode()
        async with ClientSession(url) as session:
            headers = {"Content-Type": "application/json", "Content-Encoding": "deflate"}
            async with session.post(
                "/v1/chat/completions", data=zlib.compress(whole), headers=headers
            ) as response:
                assert response.status == 200, await response.text()
    assert head.startswith(b"HTTP/1.1 400 "), head
    message = message_of(path, json.loads(body))
    assert "Content-Encoding: deflate" in message and "not complete deflate" in message, message
    assert next_reply.startswith(b"HTTP/1.1 200 ") and next_reply.count(b"HTTP/1.") == 1, next_reply
    assert not tracebacks(caplog), tracebacks(caplog)


# --- lone surrogates -----------------------------------------------------------------------------


async def test_a_lone_surrogate_caption_is_a_400_and_the_file_is_untouched(
    tiny_short: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gallery = tmp_path / "gallery"
    save(gallery / "a.png", 3)
    (gallery / "a.txt").write_text("the old caption", encoding="utf-8")
    settings = dataclasses.replace(tiny_short, gallery=gallery, gallery_writable=True)
    raw = b'{"path": "a.png", "text": "a cat \\ud800 on a mat"}'
    async with running_server(settings) as url, ClientSession(url) as session:
        headers = {"Content-Type": "application/json"}
        async with session.post("/ui/api/gallery/save", data=raw, headers=headers) as response:
            assert response.status == 400, await response.text()
            error = (await response.json())["error"]
        assert "U+D800" in error["message"] and "valid Unicode" in error["message"]
        emoji = {"path": "a.png", "text": "a cat 🐈"}
        async with session.post("/ui/api/gallery/save", json=emoji) as response:
            assert response.status == 200  # a proper pair (an emoji) is saved
    assert (gallery / "a.txt").read_text(encoding="utf-8") == "a cat 🐈"
    assert sorted(path.name for path in gallery.iterdir()) == ["a.png", "a.txt"]  # no temp file left
    assert not tracebacks(caplog)


async def test_a_lone_surrogate_echoed_in_a_responses_stream_keeps_the_stream_valid(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    raw = json.dumps(responses(stream=True))[:-1] + ', "instructions": "say \\ud800"}'
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        headers = {"Content-Type": "application/json"}
        async with session.post("/v1/responses", data=raw, headers=headers) as response:
            assert response.status == 200
            text = (await response.read()).decode("utf-8")  # valid UTF-8 throughout
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[0]["response"]["instructions"] == "say \ud800"  # as sent, as a JSON escape
    assert events[-1]["type"] in ("response.completed", "response.incomplete")  # no error event
    assert not tracebacks(caplog)


# --- a client that leaves a streamed request for several images --------------------------------


class HeldCaptioner(FlorenceCaptioner):
    """The real tiny captioner, whose batches wait until the test sets ``go``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go, self.entered = threading.Event(), threading.Event()

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.entered.set()
        assert self.go.wait(60), "the test never let the batch go"
        return super().caption(batch)


async def hang_up_mid_batch(
    runner: web.AppRunner,
    captioner: HeldCaptioner,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
) -> None:
    """POST ``body`` to ``path`` on a raw connection, hang up while its batch is held, and let the
    batch go once the server has seen the client leave; returns when the access line is logged."""
    raw = json.dumps(body).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    await writer.drain()
    assert await asyncio.to_thread(captioner.entered.wait, 60)
    writer.close()
    await writer.wait_closed()
    server = runner.server
    assert server is not None
    while any(handler.transport is not None for handler in server.connections):
        await asyncio.sleep(0.01)  # until the server has seen the client go
    captioner.go.set()
    while not [r for r in caplog.records if r.name == "vision_server.access"]:
        await asyncio.sleep(0.01)


async def test_a_client_that_left_a_stream_of_several_images_is_no_500(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Served as aiohttp serves by default (``web.run_app``: handlers are not cancelled when the
    client leaves), so the reply deterministically meets the closed connection; with
    cancellation on, the same happens when the captions and the hang-up arrive together."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    captioner = HeldCaptioner.from_settings(tiny_short)
    app = create_app(tiny_short, captioner)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await hang_up_mid_batch(
            runner, captioner, caplog, "/v1/chat/completions", chat(images=2, stream=True)
        )
        assert app[ENGINE].status().jobs_running == 0
        async with ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.post("/v1/chat/completions", json=chat(images=2, stream=True)) as response:
                assert response.status == 200 and (await response.text()).endswith("data: [DONE]\n\n")
    finally:
        captioner.go.set()
        await runner.cleanup()
    access = [record for record in caplog.records if record.name == "vision_server.access"]
    assert all(" 500 " not in record.getMessage() for record in access), [r.getMessage() for r in access]
    assert not tracebacks(caplog), tracebacks(caplog)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(stream=True)),  # token by token
        ("/v1/chat/completions", chat(images=2, stream=True)),  # in one piece once done
        ("/v1/responses", responses(stream=True)),
        ("/v1/chat/completions", chat()),  # not streamed: the same 499
    ],
    ids=["chat-stream", "chat-stream-2-images", "responses-stream", "chat"],
)
async def test_a_client_that_left_before_its_reply_is_logged_and_counted_as_499(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """A stream whose write met the closed connection returned its 200 response and was logged and
    counted as a 200, where a request cancelled by the same hang-up is a 499. Served without
    handler cancellation (``web.run_app``'s default), so the reply always meets the closed
    connection, whichever the request."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    captioner = HeldCaptioner.from_settings(tiny_short)
    runner = web.AppRunner(create_app(tiny_short, captioner))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await hang_up_mid_batch(runner, captioner, caplog, path, body)
        async with ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.get("/metrics") as response:
                metrics = await response.text()
    finally:
        captioner.go.set()
        await runner.cleanup()
    route = "openai.responses" if path == "/v1/responses" else "openai.chat_completions"
    access = [r for r in caplog.records if r.name == "vision_server.access" and r.route == route]  # type: ignore[attr-defined]
    assert [r.status for r in access] == [499], [r.getMessage() for r in access]  # type: ignore[attr-defined]
    assert f'vision_server_request_duration_seconds_count{{route="{route}",status="499"}} 1.0' in metrics
    assert f'route="{route}",status="200"' not in metrics
    assert not tracebacks(caplog), tracebacks(caplog)


async def leave_mid_download(port: int, request: bytes) -> None:
    """Send ``request`` on a connection with a small receive window, read the first bytes of the
    reply, and hang up with a reset, far from the end of a reply of megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    await writer.drain()
    assert (await reader.readexactly(12)) == b"HTTP/1.1 200"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("route", ["gallery.image", "gallery.export"])
async def test_a_client_that_left_a_gallery_download_is_logged_and_counted_as_499(
    tiny_short: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    """A download was written by aiohttp after the handler (and the access log) had returned, so a
    client that left halfway through a 32 MB file or export was logged and counted as a 200."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    with (gallery / "big.png").open("wb") as handle:
        handle.truncate(32 * 1024 * 1024)  # the gallery serves files as they are: never decoded
    paths = []
    for number in range(64):  # 64 rows of two 250 KB captions each: a 32 MB export
        save(gallery / f"{number}.png", number)
        (gallery / f"{number}.txt").write_text("a" * 250_000, encoding="utf-8")
        paths.append(f"{number}.png")
    settings = dataclasses.replace(tiny_short, gallery=gallery)
    if route == "gallery.image":
        request = b"GET /ui/api/gallery/image?path=big.png HTTP/1.1\r\nHost: localhost\r\n\r\n"
    else:
        body = json.dumps({"paths": paths}).encode()
        request = (
            b"POST /ui/api/gallery/export HTTP/1.1\r\nHost: localhost\r\n"
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    async with running_server(settings) as url:
        await leave_mid_download(URL(url).port or 0, request)
        while not [r for r in caplog.records if getattr(r, "route", None) == route]:
            await asyncio.sleep(0.01)
        async with ClientSession(url) as session:
            async with session.get("/metrics") as response:
                metrics = await response.text()
            async with session.get("/ui/api/gallery/image?path=0.png") as response:  # a whole one
                assert response.status == 200 and response.headers["X-Request-ID"]
                assert (await response.read()) == (gallery / "0.png").read_bytes()
    access = [r for r in caplog.records if getattr(r, "route", None) == route]
    assert [r.status for r in access][:1] == [499], [r.getMessage() for r in access]  # type: ignore[attr-defined]
    assert f'vision_server_request_duration_seconds_count{{route="{route}",status="499"}} 1.0' in metrics
    assert f'route="{route}",status="200"' not in metrics
    assert not tracebacks(caplog), tracebacks(caplog)


# --- a JPEG of thousands of scans ------------------------------------------------------------------


def many_scans(count: int, side: int = 256) -> bytes:
    """A progressive JPEG whose first scan (the DC one) is followed by ``count`` DC refinement
    scans of one byte each: libjpeg warns about the odd progression and decodes every one."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    first = data.index(b"\xff\xda")
    second = data.index(b"\xff\xda", first + 2)
    component = data[first + 5]
    refine = b"\xff\xda\x00\x08\x01" + bytes([component, 0x00, 0x00, 0x00, 0x10]) + b"\x00"
    return data[:second] + refine * count + b"\xff\xd9"


async def test_a_jpeg_of_thousands_of_scans_is_a_400_in_every_family(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = base64.b64encode(many_scans(SCANS)).decode()
    progressive = io.BytesIO()
    Image.new("RGB", (300, 200), (20, 90, 160)).save(progressive, "JPEG", progressive=True, quality=95)
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies(jpeg=bomb).items():
            text = json.dumps(body)
            headers = {"Content-Type": "application/json"}
            async with session.post(path, data=text, headers=headers) as response:
                assert response.status == 400, (path, await response.text())
                message = message_of(path, await response.json())
            assert f"{SCANS + 1} scans" in message and "baseline" in message, (path, message)
        form = FormData()
        form.add_field("image", many_scans(SCANS), filename="bomb.jpg")
        async with session.post("/caption", data=form) as response:
            assert response.status == 400 and "scans" in (await response.json())["detail"]
        form = FormData()
        form.add_field("image", progressive.getvalue(), filename="photo.jpg")  # an ordinary one
        async with session.post("/caption", data=form) as response:
            assert response.status == 200, await response.text()
    assert not tracebacks(caplog)


# --- millions of JSON values -----------------------------------------------------------------------


async def test_a_body_of_a_million_json_values_is_a_400_before_it_is_parsed(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """json.loads holds the GIL for the whole parse: 18 MB of ``[[],[],...]`` stalled every other
    request (``/health`` too) for seconds. Commas and brackets inside strings (a long system
    message, a table with line breaks, a long history) are not values, and do not count."""
    junk = "[" + "[]," * 1_000_000 + "[]]"
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies().items():
            raw = json.dumps(body)[:-1] + f', "x": {junk}}}'
            headers = {"Content-Type": "application/json"}
            async with session.post(path, data=raw, headers=headers) as response:
                assert response.status == 400, (path, await response.text())
                message = message_of(path, await response.json())
            assert "JSON values" in message and "the limit is 100000" in message, (path, message)
        strings = json.dumps(['"a", "b"'] * 400_000)  # as many strings as a bomb has values
        raw = json.dumps(chat())[:-1] + f', "x": {strings}}}'
        async with session.post("/v1/chat/completions", data=raw, headers=headers) as response:
            assert response.status == 400, await response.text()
        system = {"role": "system", "content": "a, " * 150_000}  # 150,000 commas in one string
        table = 'name, age, city, "quote", [x], {y}\n' * 40_000  # the same in lines, escaped
        history = [{"role": "user", "content": "hi, [there], {you}\\"} for _ in range(30_000)]
        for messages in ([system], [{"role": "system", "content": table}], history):
            body = chat()
            body["messages"][:0] = messages
            async with session.post("/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
    assert not tracebacks(caplog)


# --- a form of thousands of parts ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/caption", "/batch_caption", "/ui/api/caption"])
async def test_a_form_of_thousands_of_parts_is_a_400(
    tiny_short: Settings, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp reads each part in the event loop: 400,000 empty ones (19 MB) took 53 s, with
    /health stalled for seconds at a time. What a form may hold is read; more parts are refused."""
    empty = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
    image = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + image_bytes(1)
    body = empty * 5000 + image + b"\r\n--B--\r\n"
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        headers = {"Content-Type": "multipart/form-data; boundary=B"}
        async with session.post(path, data=body, headers=headers) as response:
            assert response.status == 400, await response.text()
            message = message_of(path, await response.json())
        assert "more than 80 parts" in message and "--max-images-per-request" in message, message
        few = empty * 60 + image + b"\r\n--B--\r\n"  # a form with a few dozen fields still works
        async with session.post(path, data=few, headers=headers) as response:
            assert response.status == 200, await response.text()
    assert not tracebacks(caplog)


async def test_a_megabyte_keep_alive_is_a_400(tiny_short: Settings) -> None:
    """A duration string is read in the event loop: 8 MB of "1h1h..." held every request for 4 s."""
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies(keep_alive="1h" * 500_000).items():
            async with session.post(path, json=body) as response:
                assert response.status == 400, (path, await response.text())
                message = message_of(path, await response.json())
            assert "1000000 characters" in message and "'keep_alive' must be" in message, (path, message)
        async with session.post(
            "/process_image", json=json_bodies(keep_alive="1h30m")["/process_image"]
        ) as r:
            assert r.status == 200 and r.headers["X-Keep-Alive"] == "5400"


# --- a TIFF tile larger than its image -------------------------------------------------------------


def tiled_tiff(size: int, tile: tuple[int, int]) -> bytes:
    """A greyscale ``size`` x ``size`` TIFF stored as one deflated tile of ``tile`` (zeros)."""
    payload = zlib.compress(b"\0" * (tile[0] * tile[1]), 9)
    ifd_at = 8 + len(payload) + len(payload) % 2
    long, short = 4, 3
    tags = [
        (256, long, size), (257, long, size), (258, short, 8), (259, short, 8), (262, short, 1),
        (277, short, 1), (322, long, tile[0]), (323, long, tile[1]), (324, long, 8),
        (325, long, len(payload)),
    ]  # fmt: skip
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, value)
        if kind == long
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )
    head = b"II*\0" + struct.pack("<I", ifd_at) + payload
    return head.ljust(ifd_at, b"\0") + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)


async def test_a_tiff_tile_over_the_pixel_limit_is_a_413_in_every_family(
    tiny_short: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = tiled_tiff(64, (8192, 8192))  # 64 KB for 67 million pixels in one tile
    assert len(bomb) < 100_000
    encoded = base64.b64encode(bomb).decode()
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies(jpeg=encoded).items():
            async with session.post(path, json=body) as response:
                assert response.status == 413, (path, await response.text())
                message = message_of(path, await response.json())
            assert "tiles of 67108864 pixels" in message and "64x64" in message, (path, message)
        form = FormData()
        form.add_field("image", bomb, filename="bomb.tif")
        async with session.post("/caption", data=form) as response:
            assert response.status == 413, await response.text()
        form = FormData()
        form.add_field("image", tiled_tiff(64, (64, 64)), filename="tiled.tif")  # an ordinary tiled one
        async with session.post("/caption", data=form) as response:
            assert response.status == 200, await response.text()
    assert not tracebacks(caplog)


async def test_gallery_thumbnails_refuse_the_same_traps(
    tiny_short: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dataset comes from anywhere (a scrape): its thumbnails are made under the same limits."""
    gallery = tmp_path / "gallery"
    save(gallery / "fine.png", 3)
    (gallery / "scans.jpg").write_bytes(many_scans(SCANS))
    (gallery / "tile.tif").write_bytes(tiled_tiff(64, (8192, 8192)))
    settings = dataclasses.replace(tiny_short, gallery=gallery)
    async with running_server(settings) as url, ClientSession(url) as session:
        for name, says in (("scans.jpg", f"{SCANS + 1} scans"), ("tile.tif", "tiles of 67108864 pixels")):
            async with session.get("/ui/api/gallery/thumb", params={"path": name}) as response:
                assert response.status == 400, name
                message = message_of("/ui/", await response.json())
            assert f"No thumbnail for {name}" in message and says in message, message
        async with session.get("/ui/api/gallery/thumb", params={"path": "fine.png"}) as response:
            assert response.status == 200 and response.content_type == "image/jpeg"
    assert not tracebacks(caplog)


# --- numbers JSON does not have --------------------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_nan_and_infinite_numbers_are_a_400_not_an_echo(
    tiny_short: Settings, number: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Python's json reads them; the Responses API echoed ``metadata`` with them in it, a reply
    JSON.parse refuses. Now no field takes them, read or not."""
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        for path, body in json_bodies().items():
            raw = json.dumps(body)[:-1] + f', "metadata": {{"score": {number}}}}}'
            headers = {"Content-Type": "application/json"}
            async with session.post(path, data=raw, headers=headers) as response:
                assert response.status == 400, (path, await response.text())
                message = message_of(path, await response.json())
            assert "not valid JSON" in message and number.lstrip("-") in message, (path, message)
    assert not tracebacks(caplog)


async def test_a_urlencoded_form_of_thousands_of_fields_is_a_400_that_says_so(tiny_short: Settings) -> None:
    """aiohttp's 413 read as a body over --max-request-bytes ("send a smaller image") for 2 KB."""
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with session.post("/caption", data=b"a&" * 2000, headers=headers) as response:
            assert response.status == 400, await response.text()
            message = (await response.json())["detail"]
    assert (
        "form fields" in message and "multipart/form-data" in message and "--max-request-bytes" not in message
    )


async def test_export_of_a_file_name_that_is_not_utf8(tiny_short: Settings, tmp_path: Path) -> None:
    """A dataset unpacked from another system's zip: its name reaches Python as lone surrogates,
    and the export (one JSON line per image) was a 500 for the whole selection."""
    gallery = tmp_path / "gallery"
    save(gallery / "fine.png", 3)
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
    (gallery / "fine.png").rename(gallery / odd)
    save(gallery / "fine.png", 4)
    settings = dataclasses.replace(tiny_short, gallery=gallery)
    async with running_server(settings) as url, ClientSession(url) as session:
        async with session.post("/ui/api/gallery/export", json={"paths": ["fine.png", odd]}) as response:
            assert response.status == 200, await response.text()
            lines = (await response.read()).decode("utf-8").splitlines()
    names = [json.loads(line)["file_name"] for line in lines]
    assert names == ["fine.png", odd] and (gallery / names[1]).exists()


async def test_gallery_messages_show_a_name_that_is_not_utf8_readably(
    tiny_short: Settings, tmp_path: Path
) -> None:
    """Recaption results and save errors name the image and its caption file; a Latin-1 name came
    back as lone surrogates, which the page shows as U+FFFD, where the listing shows ``\\xe9``."""
    gallery = tmp_path / "gallery"
    for seed, name in enumerate((b"caf\xe9.png", b"caf\xe9.jpg", b"th\xe9.png")):
        save(gallery / os.fsdecode(name), seed)
    os.mkdir(gallery / os.fsdecode(b"th\xe9.txt"))
    pair = "neither is captioned, rename one of them"
    settings = dataclasses.replace(tiny_short, gallery=gallery, gallery_writable=True)
    async with running_server(settings) as url, ClientSession(url) as session:
        body = {"paths": [os.fsdecode(b"caf\xe9.png")], "task": "CAPTION", "save": True}
        async with session.post("/ui/api/gallery/recaption", json=body) as response:
            assert response.status == 200, await response.text()
            [result] = (await response.json())["results"]
        assert result["error"] == f"shares its caption file caf\\xe9.txt with caf\\xe9.jpg; {pair}"
        body = {"path": os.fsdecode(b"caf\xe9.jpg"), "source": ".txt", "text": "a cat"}
        async with session.post("/ui/api/gallery/save", json=body) as response:
            assert response.status == 409, await response.text()
            message = message_of("/ui/", await response.json())
        assert message == f"caf\\xe9.jpg shares its caption file caf\\xe9.txt with caf\\xe9.png; {pair}"
        body = {"paths": [os.fsdecode(b"th\xe9.png")], "task": "CAPTION", "save": True}
        async with session.post("/ui/api/gallery/recaption", json=body) as response:
            assert response.status == 200, await response.text()
            [result] = (await response.json())["results"]
        folder = "th\\xe9.txt is a directory, not a caption file"
        assert result["error"] == f"Cannot write the caption file th\\xe9.txt of th\\xe9.png: {folder}."


async def test_an_unknown_model_name_of_a_megabyte_is_not_echoed_whole(tiny_short: Settings) -> None:
    """With several models an unknown name is a 404 that names it: a 1 MB name came back whole."""
    settings = dataclasses.replace(tiny_short, model=("a=test:tiny", "b=test:tiny"))
    name = "m" * 1_000_000 + "-end"
    async with running_server(settings) as url, ClientSession(url) as session:
        for path, body in json_bodies(model=name).items():
            async with session.post(path, json=body) as response:
                assert response.status == 404, path
                message = message_of(path, await response.json())
            assert len(message) < 300 and "1000004 characters" in message and "-end'" in message, message
            assert "Served: a, b" in message, message


async def test_a_long_unknown_name_in_a_model_lookup_is_not_echoed_whole(tiny_short: Settings) -> None:
    """A lookup never takes the one-model shortcut: with one model served, ``/v1/models/NAME``
    (a name as long as a request line may be) and ``?model=`` are 404s that quote its ends."""
    name = "m" * 7000 + "-end"
    async with running_server(tiny_short) as url, ClientSession(url) as session:
        lookups = (f"/v1/models/{name}", f"/models/{name}", f"/prompts?model={name}", f"/tasks?model={name}")
        for path in lookups:
            async with session.get(path) as response:
                assert response.status == 404, path
                reply = await response.json()
            message = str(reply["error"]["message"] if "error" in reply else reply["detail"])
            assert len(message) < 300 and "7004 characters" in message and "-end'" in message, message


async def test_an_image_whose_name_is_not_utf8_is_reached_through_its_ref(
    tiny_short: Settings, tmp_path: Path
) -> None:
    """A lone surrogate cannot go in a URL (the page's ``encodeURIComponent`` throws on it), and
    ``%E9`` decoded as UTF-8 is U+FFFD: the listing's ``ref`` (the name's bytes, percent-encoded)
    reaches the image, and ``name`` shows it readably; a UTF-8 name's ``ref`` is the usual one."""
    gallery = tmp_path / "gallery"
    save(gallery / "fine.png", 3)
    odd = os.fsdecode(b"caf\xe9 1+1.png")
    (gallery / "fine.png").rename(gallery / odd)
    save(gallery / "d\u00e9j\u00e0 vu.png", 4)
    settings = dataclasses.replace(tiny_short, gallery=gallery)
    async with running_server(settings) as url, ClientSession() as session:
        async with session.get(f"{url}/ui/api/gallery") as response:
            items = (await response.json())["items"]
        assert [(i["path"], i["name"], i["ref"]) for i in items] == [
            (odd, "caf\\xe9 1+1.png", "caf%E9%201%2B1.png"),
            ("d\u00e9j\u00e0 vu.png", "d\u00e9j\u00e0 vu.png", "d%C3%A9j%C3%A0%20vu.png"),
        ]
        for item in items:
            for route in ("thumb", "image"):
                address = URL(f"{url}/ui/api/gallery/{route}?path={item['ref']}", encoded=True)
                async with session.get(address) as response:
                    assert response.status == 200, (route, item, await response.text())
        image = f"{url}/ui/api/gallery/image?path="
        async with session.get(URL(image + "caf%E9+1%2B1.png", encoded=True)) as response:
            assert response.status == 200  # "+" is a space, as in any query
        async with session.get(URL(image + "caf%C3%A9%201%2B1.png", encoded=True)) as response:
            assert response.status == 404  # the UTF-8 spelling is another name
