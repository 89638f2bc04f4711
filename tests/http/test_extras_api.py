"""SillyTavern, both ways it captions (Extras from the browser, Custom OpenAI-compatible from its
server), with the exact requests it sends; and CORS for the browser path."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.api import native_caption
from tests.support.images import b64, data_url
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

ST_ORIGIN = "http://127.0.0.1:8000"
# SillyTavern's Extras client (extensions.js / caption/index.js)
EXTRAS_HEADERS = {"Content-Type": "application/json", "Bypass-Tunnel-Reminder": "bypass"}


async def extras_caption(session: ClientSession, body: Any, **headers: str) -> tuple[int, Any]:
    async with session.post("/api/caption", json=body, headers={**EXTRAS_HEADERS, **headers}) as response:
        return response.status, await response.json()


# --- Extras -------------------------------------------------------------------------------------


async def test_sillytavern_extras_handshake_and_caption(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        async with session.get("/api/modules") as response:
            assert response.status == 200 and await response.json() == {"modules": ["caption"]}
        expected, *replies = await asyncio.gather(
            native_caption(session, 21, "<MORE_DETAILED_CAPTION>"),
            extras_caption(session, {"image": b64(21)}),  # base64 without a prefix, as ST sends it
            extras_caption(session, {"image": data_url(21)}),  # FloCap accepts data URLs too
            extras_caption(session, {"image": b64(21)}, Authorization="Bearer "),
        )
    assert replies == [(200, {"caption": expected})] * 3


async def test_extras_prompt_picks_the_task(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        expected, reply = await asyncio.gather(
            native_caption(session, 22, "<GENERATE_TAGS>"),
            extras_caption(session, {"image": b64(22), "prompt": "booru tags"}),
        )
    assert reply == (200, {"caption": expected})


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, '"image" is required'),
        ({"image": 5}, 400, '"image" is required'),
        ({"image": "@@@"}, 400, "Invalid image data"),
        ({"image": "aGVsbG8="}, 400, "Invalid image data"),
        ({"image": "AAAA", "prompt": 3}, 400, '"prompt"'),
        ({"image": "AAAA", "prompt": "<OD>"}, 400, "<GENERATE_TAGS>"),
    ],
)
async def test_extras_errors(tmp_path: Path, body: Any, status: int, words: str) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        got, reply = await extras_caption(session, body)
    assert got == status and set(reply) == {"error"} and words in reply["error"]


async def test_extras_bad_json_and_too_large(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path, max_request_bytes=50_000), FakeCaptioner()) as session:
        async with session.post("/api/caption", data=b"nope", headers=EXTRAS_HEADERS) as response:
            assert response.status == 400 and "JSON" in (await response.json())["error"]
        status, reply = await extras_caption(session, {"image": "A" * 60_000})
        assert status == 413 and "too large" in reply["error"]


# --- Custom (OpenAI-compatible) -----------------------------------------------------------------


async def test_sillytavern_custom_openai_source(tiny: Settings) -> None:
    """ST's server posts to {server_url}/chat/completions, where server_url includes /v1."""
    body = {
        "model": "gpt-4-turbo",
        "messages": [
            {"role": "system", "content": "You are a captioning assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this image?"},
                    {"type": "image_url", "image_url": {"url": data_url(23, "JPEG")}},
                ],
            },
        ],
    }
    headers = {"Content-Type": "application/json", "Authorization": "Bearer "}  # no key stored in ST
    async with client_for(tiny) as session:
        async with session.get("/v1/models", headers=headers) as response:  # ST's connection check
            assert response.status == 200 and (await response.json())["data"][0]["id"] == "test:tiny"
        async with session.post(
            "/process_image", json={"image": b64(23, "JPEG"), "prompt": "<MORE_DETAILED_CAPTION>"}
        ) as r:
            expected = (await r.json())["result"]
        async with session.post("/v1/chat/completions", json=body, headers=headers) as response:
            reply = await response.json()
    assert response.status == 200
    assert str(reply["choices"][0]["message"]["content"]).strip() == expected


# --- CORS ---------------------------------------------------------------------------------------


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization,bypass-tunnel-reminder",
    }


async def test_cors_preflight_and_replies_for_an_allowed_origin(tiny: Settings) -> None:
    settings = Settings(
        model=tiny.model, cache_dir=tiny.cache_dir, idle_timeout=-1, cors_origins=(ST_ORIGIN,)
    )
    async with client_for(settings) as session:
        async with session.options("/api/caption", headers=preflight_headers(ST_ORIGIN)) as response:
            assert response.status in (200, 204)
            assert response.headers["Access-Control-Allow-Origin"] == ST_ORIGIN
            allowed = response.headers["Access-Control-Allow-Headers"].lower()
            assert all(
                name in allowed for name in ("content-type", "authorization", "bypass-tunnel-reminder")
            )
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
        async with session.post(
            "/api/caption", json={"image": b64(24)}, headers={**EXTRAS_HEADERS, "Origin": ST_ORIGIN}
        ) as response:
            assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == ST_ORIGIN
        async with session.post("/api/caption", json={}, headers={"Origin": ST_ORIGIN}) as response:
            assert response.status == 400 and response.headers["Access-Control-Allow-Origin"] == ST_ORIGIN


# What the OpenAI JavaScript SDK (openai-node, dangerouslyAllowBrowser) asks a preflight to allow
# for a streamed chat completion: its X-Stainless-* telemetry headers, more with each release.
OPENAI_JS_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-helper-method,x-stainless-lang,"
    "x-stainless-os,x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
    "x-stainless-runtime-version,x-stainless-timeout"
)


async def test_cors_preflight_allows_the_headers_a_browser_sdk_asks_for(tmp_path: Path) -> None:
    """A page using the OpenAI JS SDK: a fixed allow list made the browser drop every request
    ("Request header field x-stainless-os is not allowed by Access-Control-Allow-Headers")."""
    settings = Settings(cache_dir=tmp_path, cors_origins=(ST_ORIGIN,), api_key="secret")
    asked = {**preflight_headers(ST_ORIGIN), "Access-Control-Request-Headers": OPENAI_JS_HEADERS}
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.options("/v1/chat/completions", headers=asked) as response:
            assert response.status == 204
            allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
            assert set(OPENAI_JS_HEADERS.split(",")) <= allowed
            assert {"x-priority", "x-client-id", "bypass-tunnel-reminder"} <= allowed  # ours stay
            assert "access-control-request-headers" in response.headers["Vary"].lower()
        odd = {**preflight_headers(ST_ORIGIN), "Access-Control-Request-Headers": "x-ok, bad name, x(y)"}
        async with session.options("/api/caption", headers=odd) as response:
            allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
            assert "x-ok" in allowed and not {"bad name", "x(y)"} & allowed  # only header names
        async with session.options(
            "/api/caption", headers={**asked, "Origin": "http://evil.example"}
        ) as response:
            assert response.status == 403 and "Access-Control-Allow-Headers" not in response.headers


async def test_cors_refuses_other_origins(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, cors_origins=(ST_ORIGIN,))
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.options(
            "/api/caption", headers=preflight_headers("http://evil.example")
        ) as response:
            assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
        async with session.get("/api/modules", headers={"Origin": "http://evil.example"}) as response:
            assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
            assert "Origin" in response.headers["Vary"]


async def test_cors_wildcard_and_preflight_needs_no_key(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, cors_origins=("*",), api_key="secret")
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.options(
            "/v1/chat/completions", headers=preflight_headers("http://a.example")
        ) as r:
            assert r.status in (200, 204) and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_is_off_by_default(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        async with session.options("/api/caption", headers=preflight_headers(ST_ORIGIN)) as response:
            assert "Access-Control-Allow-Origin" not in response.headers
        async with session.get("/api/modules", headers={"Origin": ST_ORIGIN}) as response:
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_refused_preflights_say_how_to_allow_them_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SillyTavern's Extras page on a server without --cors-origin: the preflight got the router's
    405 and nothing reached the log (preflights are answered before the access log), so neither
    the page's console nor the server said what to do."""
    caplog.set_level(logging.WARNING, logger="vision_server")
    for origins, says in (
        ((), "--cors-origin http://127.0.0.1:8000"),
        (("http://other:1",), "--cors-origin"),
    ):
        caplog.clear()
        async with client_for(Settings(cache_dir=tmp_path, cors_origins=origins), FakeCaptioner()) as session:
            for _ in range(3):
                async with session.options("/api/caption", headers=preflight_headers(ST_ORIGIN)) as response:
                    assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
                    assert says in (await response.json())["error"]
        refusals = [r.getMessage() for r in caplog.records if "refused a browser page" in r.getMessage()]
        assert len(refusals) == 1 and says in refusals[0] and "POST /api/caption" in refusals[0]


async def test_extras_with_a_key_configured(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path, api_key="sekret"), FakeCaptioner()) as session:
        status, reply = await extras_caption(session, {"image": b64(1)}, Authorization="Bearer ")
        assert status == 401 and set(reply) == {"error"}
        status, reply = await extras_caption(session, {"image": b64(1)}, Authorization="Bearer sekret")
        assert status == 200 and reply["caption"]
