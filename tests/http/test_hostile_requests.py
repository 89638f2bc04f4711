"""Requests that used to reach an unhandled exception (a 500) must be clear 4xx in each family's shape.

Huge JSON integers (Python refuses to parse more than 4300 digits), deeply nested arrays (the
JSON decoder's recursion limit), generation numbers too big for a float, and ``Authorization``
headers holding bytes that are not UTF-8. Plus the loopback admin check behind a proxy: without
``--admin-key`` a request that carries a proxy header is refused, since a proxy on this host makes
every client look local.

The bad header bytes cannot be sent with aiohttp's client (it refuses them), so those requests
are written to the socket by hand.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.api import tiny_settings
from tests.support.images import b64
from tests.support.serving import running_server
from vision_server.settings import Settings

KEY = "hostile-test-key"
ADMIN = "hostile-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_ROUTES = ("/process_image", "/v1/chat/completions", "/api/caption")


def error_message(path: str, body: dict[str, Any]) -> str:
    """The message of an error reply, read from the shape of the route's family."""
    if path.startswith("/v1/"):
        return str(body["error"]["message"])
    if path == "/api/caption":
        return str(body["error"])
    return str(body["detail"])


async def raw_request(url: str, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as written and return the status and the JSON body of the reply."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        reply = await reader.read()
    finally:
        writer.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload)


def raw_post(path: str, headers: bytes, body: bytes = b"{}") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory, api_key=KEY)


@pytest.mark.parametrize("path", JSON_ROUTES)
async def test_json_integer_past_the_digit_limit_is_a_400(keyed: Settings, path: str) -> None:
    body = b'{"image": ' + b"7" * 5000 + b"}"
    async with running_server(keyed) as url, ClientSession(url) as session:
        async with session.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"}) as r:
            assert r.status == 400, await r.text()
            assert "more than 4300 digits" in error_message(path, await r.json())


@pytest.mark.parametrize("path", JSON_ROUTES)
async def test_deeply_nested_json_is_a_400(keyed: Settings, path: str) -> None:
    depth = 100_000
    body = b"[" * depth + b"]" * depth
    async with running_server(keyed) as url, ClientSession(url) as session:
        async with session.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"}) as r:
            assert r.status == 400, await r.text()
            assert "too deeply" in error_message(path, await r.json())


async def test_nesting_just_inside_the_decoder_limit_is_still_a_400(keyed: Settings) -> None:
    """Values that parse but are nested almost to the limit must not break the error message."""
    async with running_server(keyed) as url, ClientSession(url) as session:
        for depth in (900, 950, 980, 990):
            nested = "[" * depth + "]" * depth
            body = f'{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "stream": {nested}}}'
            async with session.post(
                "/v1/chat/completions", data=body, headers={**AUTH, "Content-Type": "application/json"}
            ) as r:
                assert r.status == 400, (depth, await r.text())


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "temperature", "top_p"])
async def test_a_400_digit_generation_number_is_a_400_naming_the_field(keyed: Settings, field: str) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(3)}"}}
    for sign in ("", "-"):
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": [image]}],
            field: int(sign + "9" * 400),
        }
        async with running_server(keyed) as url, ClientSession(url) as session:
            async with session.post("/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status == 400, await r.text()
                error = (await r.json())["error"]
                assert error["param"] == field and field in error["message"]
                assert len(error["message"]) < 200  # the number is shortened, not echoed in full


@pytest.mark.parametrize(
    ("path", "method"),
    [("/process_image", "POST"), ("/v1/models", "GET"), ("/api/caption", "POST"), ("/v1/model/load", "POST")],
)
@pytest.mark.parametrize("token", [b"\xff", b"hostile-test-key\xe9", b"\xc3\x28"])
async def test_non_utf8_bearer_token_is_a_401(keyed: Settings, path: str, method: str, token: bytes) -> None:
    async with running_server(keyed) as url:
        headers = b"Authorization: Bearer " + token + b"\r\n"
        request = raw_post(path, headers).replace(b"POST", method.encode(), 1)
        status, body = await raw_request(url, request)
    assert status == 401
    assert "not UTF-8" in error_message(path, body)


async def test_non_utf8_admin_token_is_a_403(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Only an admin key configured: the admin check itself reads the odd header."""
    settings = tiny_settings(tmp_path_factory, admin_key=ADMIN)
    async with running_server(settings) as url:
        status, body = await raw_request(url, raw_post("/v1/model/unload", b"Authorization: Bearer \xff\r\n"))
    assert status == 403 and "admin key" in error_message("/v1/model/unload", body)


async def test_the_right_key_still_works_after_the_bad_ones(keyed: Settings) -> None:
    async with running_server(keyed) as url:
        await raw_request(url, raw_post("/process_image", b"Authorization: Bearer \xff\r\n"))
        async with ClientSession(url) as session:
            body = {"image": b64(5), "prompt": "<CAPTION>"}
            async with session.post("/process_image", json=body, headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["result"]


# --- loopback admin behind a proxy -------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9;proto=https"},
        {"X-Real-IP": "203.0.113.9"},
        {"X-Forwarded-For": "127.0.0.1"},  # what a proxy on this host might pass on for itself
    ],
)
async def test_loopback_admin_refuses_proxied_requests(
    tmp_path_factory: pytest.TempPathFactory, header: dict[str, str]
) -> None:
    settings = tiny_settings(tmp_path_factory)
    async with running_server(settings) as url, ClientSession(url) as session:
        async with session.post("/v1/model/unload", headers=header) as r:
            assert r.status == 403, await r.text()
            message = error_message("/v1/model/unload", await r.json())
            assert "--admin-key" in message and "proxy" in message
        async with session.post("/v1/model/unload") as r:
            assert r.status == 200, await r.text()  # the same client without the proxy header


async def test_admin_key_works_through_a_proxy(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = tiny_settings(tmp_path_factory, admin_key=ADMIN)
    headers = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {ADMIN}"}
    async with running_server(settings) as url, ClientSession(url) as session:
        async with session.post("/v1/model/unload", headers=headers) as r:
            assert r.status == 200, await r.text()
        async with session.post("/v1/model/unload", headers={"X-Forwarded-For": "203.0.113.9"}) as r:
            assert r.status == 401


# --- found by the property-based test (tests/test_fuzz_requests.py) ------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=nope"]
)
async def test_urlencoded_form_that_is_not_text_is_a_400(keyed: Settings, content_type: str) -> None:
    async with running_server(keyed) as url, ClientSession(url) as session:
        headers = {**AUTH, "Content-Type": content_type}
        async with session.post("/caption", data=b"image=\x89PNG\r\n\x1a\n", headers=headers) as r:
            assert r.status == 400, await r.text()
            assert "Malformed form body" in (await r.json())["detail"]


def test_unparsable_http_is_logged_as_one_line_without_traceback() -> None:
    """aiohttp logs a request it cannot parse as an ERROR with a traceback; a client's mistake is INFO."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from vision_server.logs import MalformedRequestFilter

    try:
        raise BadHttpMessage("Invalid header value char")
    except BadHttpMessage:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("127.0.0.1",),
            sys.exc_info(),
        )  # fmt: skip
    assert MalformedRequestFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "Error handling request from 127.0.0.1: 400 Invalid header value char"
    crash = logging.makeLogRecord(
        {"levelno": logging.ERROR, "exc_info": (RuntimeError, RuntimeError(), None)}
    )
    assert MalformedRequestFilter().filter(crash) and crash.levelno == logging.ERROR  # ours stay errors


STALLED_BODY_ROUTES = [
    ("/process_image", b"Content-Type: application/json\r\n"),
    ("/v1/chat/completions", b"Content-Type: application/json\r\n"),
    ("/api/caption", b"Content-Type: application/json\r\n"),
    ("/caption", b"Content-Type: multipart/form-data; boundary=XyZ\r\n"),
    ("/batch_caption", b"Content-Type: multipart/form-data; boundary=XyZ\r\n"),
]


async def test_a_stalled_body_is_a_408_and_the_server_keeps_serving(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A slowloris-style client announces a body and sends a few bytes of it, then nothing: each
    # family answers 408 in its own shape after --body-timeout instead of holding on forever.
    settings = tiny_settings(tmp_path_factory, body_timeout=0.5)
    async with running_server(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        for path, content_type in STALLED_BODY_ROUTES:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                    + content_type
                    + b"Content-Length: 100000\r\n\r\n--XyZ\r\n"
                )
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = json.loads(await reader.readexactly(length))
            finally:
                writer.close()
            assert head.split(b" ", 2)[1] == b"408", (path, head)
            assert "--body-timeout" in error_message(path, body), (path, body)
        async with ClientSession(url) as session, session.get("/prompts") as r:
            assert r.status == 200


async def test_a_wrong_method_is_a_405_in_the_routes_own_shape(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # An OpenAI SDK reports error.message; a 405 in the native {"detail"} shape read as no message.
    async with running_server(tiny_settings(tmp_path_factory)) as url, ClientSession(url) as session:
        for method, path in (
            ("PUT", "/v1/chat/completions"),
            ("DELETE", "/api/caption"),
            ("PUT", "/process_image"),
        ):
            async with session.request(method, path) as r:
                assert r.status == 405 and r.headers["Allow"], path
                assert error_message(path, await r.json()) == "Method Not Allowed", path
        async with session.get("/v1/model/load") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        async with session.put("/nowhere") as r:
            assert r.status == 404 and (await r.json()) == {"detail": "Not Found"}
