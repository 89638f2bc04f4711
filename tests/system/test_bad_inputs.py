"""Hostile and broken requests against every route family of a real server process.

One table of bad inputs (bad base64, not an image, a truncated JPEG, zero bytes, a PNG that
claims 50,000 x 50,000 pixels, a body over ``--max-request-bytes``, wrong JSON types, a 1 MB
prompt, an unknown task) is sent to each route that takes an image. Every entry must get a 4xx
in that family's own error shape, and the next good request must still get a caption. Then the
table runs 200 more times against the same ``vision-server serve --model test:tiny`` process,
whose resident memory may not grow by more than 50 MB.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from aiohttp import ClientSession, ClientTimeout, FormData
from PIL import Image

from tests.support.api import tiny_cache_dir
from tests.support.images import image_bytes
from tests.support.processes import ServerProcess, tiny_server
from vision_server.api.task_words import MAX_PROMPT_CHARS, task_from_text
from vision_server.errors import BadRequest
from vision_server.tasks import PROMPTGEN_TASKS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RSS of a subprocess via psutil, POSIX paths")

LIMIT = 1_300_000  # --max-request-bytes of the server under test: a 1 MB prompt fits, 1.4 MB does not
PROMPT_1MB = "mix it up, " * 100_000  # "mix" without "plus": the worst case of the keyword table
ROUNDS = 200
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


# --- the bad payloads --------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A well-formed PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    scanline = zlib.compress(b"\0" * 64)  # far too little data, but decoders look at IHDR first
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", scanline)
        + png_chunk(b"IEND", b"")
    )


def jpeg_bytes(size: tuple[int, int] = (96, 80)) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256 + 1)).save(buffer, "JPEG")
    return buffer.getvalue()


GOOD_PNG = image_bytes(7)
TRUNCATED_JPEG = jpeg_bytes()[: len(jpeg_bytes()) // 2]
BOMB = bomb_png()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the families: how each one carries an image, a prompt and a body ----------------------------


@dataclass(frozen=True)
class Call:
    path: str
    json: Any = None
    data: Any = None  # FormData or raw bytes
    headers: dict[str, str] = field(default_factory=dict)


class Family:
    """One image route, able to send a good request and each kind of bad one."""

    name: str
    path: str

    def call(
        self, *, image: bytes | str = GOOD_PNG, prompt: str | None = None, task: str | None = None
    ) -> Call:
        raise NotImplementedError

    def wrong_types(self) -> Call:
        raise NotImplementedError

    def oversized(self) -> Call:
        raise NotImplementedError

    def message(self, body: Any) -> str:
        """The error message, checking that ``body`` has exactly this family's error shape."""
        raise NotImplementedError

    def check_good(self, body: Any) -> None:
        raise NotImplementedError


def as_text(image: bytes | str) -> str:
    """JSON families carry base64; a ``str`` is sent as it is (for the bad-base64 case)."""
    return image if isinstance(image, str) else b64(image)


def as_bytes(image: bytes | str) -> bytes:
    """Multipart carries raw bytes; a ``str`` becomes the bytes of that text."""
    return image.encode() if isinstance(image, str) else image


def detail_message(body: Any) -> str:
    assert isinstance(body, dict) and set(body) == {"detail"}, body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body["detail"]


class Native(Family):
    name, path = "native", "/process_image"

    def call(
        self, *, image: bytes | str = GOOD_PNG, prompt: str | None = None, task: str | None = None
    ) -> Call:
        return Call(self.path, json={"image": as_text(image), "prompt": task or prompt or "<CAPTION>"})

    def wrong_types(self) -> Call:
        return Call(self.path, json={"image": 12345, "prompt": ["<CAPTION>"]})

    def oversized(self) -> Call:
        return Call(self.path, json={"image": "A" * (LIMIT + 100_000), "prompt": "<CAPTION>"})

    def message(self, body: Any) -> str:
        return detail_message(body)

    def check_good(self, body: Any) -> None:
        assert isinstance(body["result"], str)


class OpenAI(Family):
    name, path = "openai", "/v1/chat/completions"

    def call(
        self, *, image: bytes | str = GOOD_PNG, prompt: str | None = None, task: str | None = None
    ) -> Call:
        text = task or prompt or "Give a short caption."
        url = image if isinstance(image, str) else f"data:image/png;base64,{b64(image)}"
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        return Call(self.path, json={"model": "any", "messages": [{"role": "user", "content": content}]})

    def wrong_types(self) -> Call:
        return Call(
            self.path, json={"model": 3, "messages": {"role": "user", "content": 42}, "max_tokens": "ten"}
        )

    def oversized(self) -> Call:
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (LIMIT + 100_000)}}
        ]
        return Call(self.path, json={"messages": [{"role": "user", "content": content}]})

    def message(self, body: Any) -> str:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), error
        return error["message"]

    def check_good(self, body: Any) -> None:
        assert isinstance(body["choices"][0]["message"]["content"], str)


class Extras(Family):
    name, path = "extras", "/api/caption"

    def call(
        self, *, image: bytes | str = GOOD_PNG, prompt: str | None = None, task: str | None = None
    ) -> Call:
        body: dict[str, Any] = {"image": as_text(image)}
        if task or prompt:
            body["prompt"] = task or prompt
        return Call(self.path, json=body)

    def wrong_types(self) -> Call:
        return Call(self.path, json={"image": ["not", "a", "string"], "prompt": {"task": 1}})

    def oversized(self) -> Call:
        return Call(self.path, json={"image": "A" * (LIMIT + 100_000)})

    def message(self, body: Any) -> str:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert isinstance(body["error"], str) and body["error"], body
        return body["error"]

    def check_good(self, body: Any) -> None:
        assert isinstance(body["caption"], str)


class Multipart(Family):
    """``/caption`` (field ``image``) or ``/batch_caption`` (field ``images``, two copies)."""

    def __init__(self, path: str, file_field: str, copies: int) -> None:
        self.name, self.path = path.strip("/"), path
        self.file_field, self.copies = file_field, copies

    def form(self, data: bytes, fields: dict[str, str]) -> FormData:
        form = FormData()
        for name, value in fields.items():
            form.add_field(name, value)
        for number in range(self.copies):
            form.add_field(self.file_field, data, filename=f"upload{number}.png", content_type="image/png")
        return form

    def call(
        self, *, image: bytes | str = GOOD_PNG, prompt: str | None = None, task: str | None = None
    ) -> Call:
        fields = {"task": task} if task else {"prompt": prompt} if prompt else {}
        return Call(self.path, data=self.form(as_bytes(image), fields))

    def wrong_types(self) -> Call:
        """A form has only strings; the wrong type is a non-number where a number belongs."""
        return Call(self.path, data=self.form(GOOD_PNG, {"num_beams": "three", "temperature": "[0.5]"}))

    def oversized(self) -> Call:
        return Call(self.path, data=self.form(b"\0" * (LIMIT + 100_000), {}))

    def message(self, body: Any) -> str:
        return detail_message(body)

    def check_good(self, body: Any) -> None:
        if self.path == "/caption":
            assert isinstance(body["caption"], str)
        else:
            assert [sorted(slot) for slot in body["results"]] == [["caption", "confidence", "filename"]] * 2


FAMILIES: list[Family] = [
    Native(),
    OpenAI(),
    Extras(),
    Multipart("/caption", "image", copies=1),
    Multipart("/batch_caption", "images", copies=2),
]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Family], Call]
    status: int
    says: str  # a word the message must contain (case-insensitive)


CASES: list[Case] = [
    Case("bad base64", lambda f: f.call(image="@@ not base64 at all! @@"), 400, "invalid image"),
    Case(
        "not an image", lambda f: f.call(image=b"Hello, I am a text file, not a picture.\n" * 4), 400, "image"
    ),
    Case("truncated JPEG", lambda f: f.call(image=TRUNCATED_JPEG), 400, "image"),
    Case("0 bytes", lambda f: f.call(image=b""), 400, "empty"),
    Case("decompression bomb", lambda f: f.call(image=BOMB), 413, "2500000000 pixels"),
    Case("body over the limit", lambda f: f.oversized(), 413, "too large"),
    Case("wrong JSON types", lambda f: f.wrong_types(), 400, ""),
    Case("1 MB prompt", lambda f: f.call(prompt=PROMPT_1MB), 400, ""),
    Case("unknown task", lambda f: f.call(task="<NOT_A_TASK>"), 400, "<CAPTION>"),
]


# --- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``vision-server serve --model test:tiny`` with short generations, so good requests are quick."""
    tmp_path = tmp_path_factory.mktemp("bad-inputs")
    options = ["--num-beams", "1", "--max-new-tokens", "4", "--max-request-bytes", str(LIMIT)]
    # torch's thread pool spins badly when test processes share 2 cores
    env = {"OMP_NUM_THREADS": "1"}
    with tiny_server(tmp_path, tiny_cache_dir(tmp_path_factory), *options, env=env) as process:
        process.wait_listening(timeout=120)
        yield process


@pytest.fixture
async def session(server: ServerProcess) -> AsyncIterator[ClientSession]:
    async with ClientSession(server.wait_listening(), timeout=ClientTimeout(total=60)) as client:
        yield client


async def send(session: ClientSession, call: Call) -> tuple[int, Any]:
    async with session.post(call.path, json=call.json, data=call.data, headers=call.headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def check_bad(session: ClientSession, family: Family, case: Case) -> None:
    status, body = await send(session, case.build(family))
    where = f"{case.name} -> {family.path}"
    assert status == case.status, f"{where}: {status} {str(body)[:300]}"
    message = family.message(body)
    assert case.says.lower() in message.lower(), f"{where}: {message[:300]}"
    assert len(message) < 2000, f"{where}: the message echoes the input ({len(message)} chars)"


async def check_good(session: ClientSession, family: Family) -> None:
    status, body = await send(session, family.call())
    assert status == 200, f"good request to {family.path}: {status} {str(body)[:300]}"
    family.check_good(body)


# --- the tests -------------------------------------------------------------------------------------


def test_the_bomb_is_a_valid_png_that_claims_50000_squared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let Pillow read the header it would refuse
    image = Image.open(io.BytesIO(BOMB))
    assert image.format == "PNG" and image.size == (50_000, 50_000) and len(BOMB) < 100


def test_prompts_are_read_in_linear_time_up_to_the_limit() -> None:
    """Many "mix" words used to cost one scan of the text each (100 KB took half a minute)."""
    longest = ("mix " * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]
    started = time.perf_counter()
    assert task_from_text(longest, PROMPTGEN_TASKS, "<CAPTION>") == "<MIXED_CAPTION>"
    assert task_from_text(longest[:-10] + " plus", PROMPTGEN_TASKS, "<CAPTION>") == "<MIXED_CAPTION_PLUS>"
    assert time.perf_counter() - started < 1.0
    with pytest.raises(BadRequest, match="limit"):
        task_from_text(longest + "x", PROMPTGEN_TASKS, "<CAPTION>")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
async def test_every_bad_input_is_a_4xx_and_the_next_request_works(
    session: ClientSession, family: Family
) -> None:
    for case in CASES:
        await check_bad(session, family, case)
        await check_good(session, family)  # the server answers the next good request


async def test_rss_stays_flat_over_200_rounds_of_the_table(
    server: ServerProcess, session: ClientSession
) -> None:
    memory = psutil.Process(server.pid)

    async def one_round(number: int) -> None:
        """The whole table at once (45 requests), then a good request to one family in turn."""
        await asyncio.gather(*(check_bad(session, family, case) for family in FAMILIES for case in CASES))
        await check_good(session, FAMILIES[number % len(FAMILIES)])

    await one_round(0)
    after_first = memory.memory_info().rss
    peak = after_first
    for number in range(1, ROUNDS):
        await one_round(number)
        peak = max(peak, memory.memory_info().rss)
    final = memory.memory_info().rss
    growth = final - after_first
    print(f"RSS after round 1: {after_first / 2**20:.1f} MiB, after {ROUNDS}: {final / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)"
    async with session.get("/v1/status") as response:
        engine = await response.json()
    assert engine["queue_depth"] == 0 and engine["jobs_running"] == 0, engine
    assert "Traceback" not in server.log_text()
