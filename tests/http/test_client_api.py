"""The Python client against small scripted aiohttp servers: wire format, retries, errors.

A stand-in server is the right tool here: it can answer 503 with a Retry-After on demand, drop
a connection, or stall, and it records when each attempt arrived with its own monotonic clock.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web

from vision_server.client import (
    AsyncVisionClient,
    AuthenticationError,
    RequestRejected,
    RetryPolicy,
    ServerBusy,
    ServerError,
    VisionClient,
    VisionClientError,
    VisionConnectionError,
    VisionHTTPError,
    VisionTimeoutError,
    task_token,
)
from vision_server.client import folder as folder_module
from vision_server.client.api import error_detail, normalize_base_url
from vision_server.client.folder import caption_folder
from vision_server.client.retry import is_gateway_outage, parse_retry_after

FAST = RetryPolicy(retries=3, base_delay=0.01, max_delay=0.02)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Script:
    """Answers requests from a list of replies in turn (the last one repeats), noting arrivals."""

    def __init__(self, *replies: Callable[[], web.StreamResponse]) -> None:
        self.replies = list(replies)
        self.arrivals: list[float] = []
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        self.headers.append(dict(request.headers))
        if request.can_read_body:
            self.requests.append(await request.json())
        reply = self.replies[min(len(self.arrivals), len(self.replies)) - 1]
        return reply()


def ok(result: str = "a red square") -> Callable[[], web.Response]:
    return lambda: web.json_response({"result": result})


def fail(status: int, detail: str, retry_after: str | None = None) -> Callable[[], web.Response]:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return lambda: web.json_response({"detail": detail}, status=status, headers=headers)


@pytest.fixture
def serve(aiohttp_server):
    """Start a server whose routes are given as {path: handler}; returns its base URL."""

    async def start(routes: dict[str, Handler]) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Wire format


async def test_caption_sends_native_request(serve, tmp_path: Path) -> None:
    script = Script(ok("  a red square \n"))
    url = await serve({"/process_image": script.handle})
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG fake")
    async with AsyncVisionClient(url, api_key="sekret") as client:
        assert await client.caption(image, task="caption") == "a red square"
        assert await client.caption(b"raw bytes", task="<Analyze>") == "a red square"
    assert script.requests[0] == {"image": base64.b64encode(b"\x89PNG fake").decode(), "prompt": "<CAPTION>"}
    assert script.requests[1]["prompt"] == "<ANALYZE>"
    assert base64.b64decode(script.requests[1]["image"]) == b"raw bytes"
    assert script.headers[0]["Authorization"] == "Bearer sekret"


async def test_an_empty_image_is_refused_before_sending(serve, tmp_path: Path) -> None:
    """The message speaks about the user's file, not about an "image string" they never wrote."""
    script = Script(fail(400, "Invalid image data: the image string is empty"))
    url = await serve({"/process_image": script.handle})
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    async with AsyncVisionClient(url, retries=0) as client:
        with pytest.raises(VisionClientError, match=r"^the file is empty \(0 bytes\): .*empty\.png$"):
            await client.caption(empty)
        with pytest.raises(VisionClientError, match=r"^the image is empty \(0 bytes\)$"):
            await client.caption(b"")
    assert script.requests == []


async def test_default_task_is_more_detailed_caption(serve) -> None:
    script = Script(ok())
    url = await serve({"/process_image": script.handle})
    async with AsyncVisionClient(url) as client:
        await client.caption(b"img")
    assert script.requests[0]["prompt"] == "<MORE_DETAILED_CAPTION>"
    assert "Authorization" not in script.headers[0]


async def test_prompts_model_status(serve) -> None:
    tokens = ["<CAPTION>", "<ANALYZE>"]

    async def prompts(_: web.Request) -> web.Response:
        return web.json_response(tokens)

    async def model(_: web.Request) -> web.Response:
        return web.json_response("test:tiny")

    async def status(_: web.Request) -> web.Response:
        return web.json_response({"state": "unloaded", "queue_depth": 0})

    url = await serve({"/prompts": prompts, "/model": model, "/v1/status": status})
    async with AsyncVisionClient(url + "/") as client:
        assert await client.prompts() == tokens
        assert await client.model() == "test:tiny"
        assert (await client.status())["state"] == "unloaded"


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("caption", "<CAPTION>"),
        ("<caption>", "<CAPTION>"),
        (" MORE_DETAILED_CAPTION ", "<MORE_DETAILED_CAPTION>"),
    ],
)
def test_task_token(raw: str, token: str) -> None:
    assert task_token(raw) == token


def test_base_url_forms() -> None:
    assert normalize_base_url("gpu-box:54880/") == "http://gpu-box:54880"
    assert normalize_base_url("https://x.example/vision/") == "https://x.example/vision"


def test_error_detail_shapes() -> None:
    assert error_detail('{"detail": "Invalid prompt"}', "Bad") == "Invalid prompt"
    assert error_detail('{"error": {"message": "nope"}}', "Bad") == "nope"
    assert error_detail('{"detail": [{"msg": "Field required"}]}', "Bad") == "Field required"
    # A proxy's HTML page: its words, not its markup.
    page = "<html><body><h1>502 Bad Gateway</h1>\nThe server returned an invalid response.\n</body></html>"
    assert error_detail(page, "Bad") == "502 Bad Gateway The server returned an invalid response."
    assert error_detail("", "Bad Gateway") == "Bad Gateway"


# ---------------------------------------------------------------------------------------------
# Retries


async def test_retry_after_is_honoured(serve) -> None:
    script = Script(fail(503, "queue full", retry_after="1"), fail(429, "slow down", retry_after="0"), ok())
    url = await serve({"/process_image": script.handle})
    async with AsyncVisionClient(url, retry_policy=FAST) as client:
        assert await client.caption(b"img") == "a red square"
    assert len(script.arrivals) == 3
    assert script.arrivals[1] - script.arrivals[0] >= 1.0  # measured on the server's side


async def test_busy_server_gives_up_after_retries(serve) -> None:
    script = Script(fail(503, "Model failed to load: no weights", retry_after="0"))
    url = await serve({"/process_image": script.handle})
    async with AsyncVisionClient(url, retry_policy=RetryPolicy(retries=2)) as client:
        with pytest.raises(ServerBusy) as caught:
            await client.caption(b"img")
    assert len(script.arrivals) == 3
    assert caught.value.status == 503
    assert caught.value.detail == "Model failed to load: no weights"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, RequestRejected),
        (413, RequestRejected),
        (422, RequestRejected),
        (401, AuthenticationError),
        (500, ServerError),
        (504, ServerError),
    ],
)
async def test_other_errors_are_not_retried(serve, status: int, error: type[VisionHTTPError]) -> None:
    script = Script(fail(status, f"Invalid image data: problem {status}"))
    url = await serve({"/process_image": script.handle})
    async with AsyncVisionClient(url, retry_policy=FAST) as client:
        with pytest.raises(error) as caught:
            await client.caption(b"img")
    assert len(script.arrivals) == 1
    assert caught.value.status == status
    assert caught.value.detail == f"Invalid image data: problem {status}"
    assert f"problem {status}" in str(caught.value)


async def test_dropped_connection_is_retried(serve) -> None:
    attempts = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            assert request.transport is not None
            request.transport.close()  # the client sees the server disconnect mid-request
            await asyncio.sleep(0.1)
        return web.json_response({"result": "ok"})

    url = await serve({"/process_image": flaky})
    async with AsyncVisionClient(url, retry_policy=FAST) as client:
        assert await client.caption(b"img") == "ok"
    assert len(attempts) == 2


class CountingPolicy(RetryPolicy):
    """Records every wait the client asks for instead of waiting long."""

    def __init__(self, retries: int) -> None:
        super().__init__(retries=retries, base_delay=0.01, max_delay=0.01)
        object.__setattr__(self, "waits", [])

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.waits.append(attempt)  # type: ignore[attr-defined]
        return super().delay(attempt, retry_after)


async def test_connection_refused_is_retried_then_raised() -> None:
    policy = CountingPolicy(retries=3)
    async with AsyncVisionClient(f"http://127.0.0.1:{closed_port()}", retry_policy=policy) as client:
        with pytest.raises(VisionConnectionError, match="cannot reach"):
            await client.prompts()
    assert policy.waits == [0, 1, 2]  # type: ignore[attr-defined]


async def test_slow_answer_times_out_without_retry(serve) -> None:
    script = Script(ok())

    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return await script.handle(request)

    url = await serve({"/process_image": stall})
    async with AsyncVisionClient(url, timeout=0.3, retry_policy=FAST) as client:
        with pytest.raises(VisionTimeoutError):
            await client.caption(b"img")


async def test_a_bad_caption_extension_is_refused_before_anything_is_made_or_sent(tmp_path: Path) -> None:
    """``--ext png`` would overwrite the images: refused (the command's usage error) before the
    JSONL output's folder is made or its lock taken, and before the server is asked anything
    (nothing listens at this address)."""
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    jsonl = tmp_path / "new" / "out.jsonl"
    async with AsyncVisionClient("http://127.0.0.1:9", model="m") as client:
        with pytest.raises(ValueError, match="is an image extension"):
            await caption_folder(client, tmp_path, ext="png", jsonl=jsonl)
    assert not jsonl.parent.exists()


async def test_a_first_request_past_its_own_cap_is_a_warning_and_the_images_are_sent(
    serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The question about --model gets FIRST_REQUEST_TIMEOUT (30 s; 0.3 here), not the client's
    timeout (600 s): past it the run warns "trying anyway" and sends the images, as the folder
    scripts do (it stopped the run with exit status 1)."""
    monkeypatch.setattr(folder_module, "FIRST_REQUEST_TIMEOUT", 0.3)

    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response(["<CAPTION>"])

    async def caption(request: web.Request) -> web.StreamResponse:
        return web.json_response({"result": "a red square"})

    url = await serve({"/prompts": stall, "/process_image": caption})
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")  # sent as it is: this server reads no image
    warnings: list[str] = []
    async with AsyncVisionClient(url, timeout=600, model="m") as client:
        with pytest.raises(VisionTimeoutError, match=r"within 0\.3 s"):
            await client.prompts(timeout=0.3)
        summary = await caption_folder(client, tmp_path, task="CAPTION", on_warning=warnings.append)
    assert summary.aborted is None and summary.done == 1
    assert (tmp_path / "a.txt").read_text() == "a red square"
    assert len(warnings) == 1 and "GET /prompts?model=m failed (no answer from " in warnings[0]
    assert warnings[0].endswith("; trying anyway")


def test_backoff_grows_and_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert 0.5 <= policy.delay(0) <= 1.0
    assert 2.0 <= policy.delay(2) <= 4.0
    assert 4.0 <= policy.delay(10) <= 8.0
    assert all(5.0 <= policy.delay(0, retry_after=5.0) <= 5.6 for _ in range(50))
    assert policy.delay(0, retry_after=10_000) <= policy.max_retry_after * 1.1 + 0.05


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# ---------------------------------------------------------------------------------------------
# Blocking client


async def test_sync_client(serve) -> None:
    script = Script(fail(400, "Invalid prompt"), ok("blocking works"))

    async def prompts(_: web.Request) -> web.Response:
        return web.json_response(["<CAPTION>"])

    url = await serve({"/process_image": script.handle, "/prompts": prompts})

    def use() -> tuple[str, list[str]]:
        with VisionClient(url, retries=0) as client:
            with pytest.raises(RequestRejected, match="Invalid prompt"):
                client.caption(b"img", "nonsense")
            return client.caption(b"img"), client.prompts()

    # The blocking client runs its own loop in a thread; this test's loop keeps serving meanwhile.
    assert await asyncio.to_thread(use) == ("blocking works", ["<CAPTION>"])


def test_sync_client_close_is_idempotent() -> None:
    client = VisionClient("http://127.0.0.1:1")
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.model()


def test_gateway_outage_is_only_a_proxys_own_bare_502_or_503() -> None:
    page = "<html><body><h1>503 Service Unavailable</h1>\nNo server is available.\n</body></html>"
    assert is_gateway_outage(503, None, page) and is_gateway_outage(502, None, "")
    assert not is_gateway_outage(503, 3.0, page)  # a Retry-After: busy, not gone
    assert not is_gateway_outage(503, None, ' {"detail": "Out of memory"}')  # a server's own word
    assert not is_gateway_outage(504, None, page)  # a deadline run past: sending again may repeat it
    assert not is_gateway_outage(429, None, page)


def proxy_page(status: int) -> Callable[[], web.Response]:
    return lambda: web.Response(
        status=status, text=f"<html><h1>{status}</h1>No server.</html>", content_type="text/html"
    )


async def test_a_servers_own_503_without_retry_after_is_no_outage(serve) -> None:
    """Only the proxy's bare page starts a server wait; a JSON 503 fails after the retries."""
    script = Script(ok(), fail(503, "Out of memory"))
    health = Script(ok())
    url = await serve({"/process_image": script.handle, "/health": health.handle})
    notes: list[str] = []
    async with AsyncVisionClient(
        url, retry_policy=FAST, wait_for_server=30, on_server_wait=notes.append
    ) as client:
        await client.caption(b"img")
        with pytest.raises(ServerBusy):
            await client.caption(b"img")
    assert notes == [] and health.arrivals == [] and len(script.arrivals) == 5


async def test_a_proxys_bare_503_waits_for_health_then_resends(serve) -> None:
    script = Script(ok(), proxy_page(503), proxy_page(502), ok("back again"))
    health = Script(proxy_page(503), proxy_page(503), ok())  # through the proxy: 503 until a server is up
    url = await serve({"/process_image": script.handle, "/health": health.handle})
    notes: list[str] = []
    policy = RetryPolicy(retries=1, base_delay=0.01, max_delay=0.02)
    async with AsyncVisionClient(
        url, retry_policy=policy, wait_for_server=30, on_server_wait=notes.append
    ) as client:
        await client.caption(b"img")
        assert await client.caption(b"img") == "back again"
    assert len(health.arrivals) == 3 and len(script.arrivals) == 4
    assert notes == [
        "no server behind the proxy answers (HTTP 502); waiting up to 30 s for it to come back",
        "server back; going on",
    ]
