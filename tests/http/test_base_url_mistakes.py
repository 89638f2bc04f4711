"""A client given a slightly wrong base URL gets a 404 that names the route it meant.

Tools build request URLs as ``base + "/chat/completions"`` (SillyTavern's Custom source, many
OpenAI-compatible clients), so a base typed with a ``/`` at its end asks for
``/v1//chat/completions``, and a base ending in ``/v1`` given to a tool that adds its own asks
for ``/v1/v1/...``; the OpenAI base URL given to a native client asks for
``/v1/process_image``. All got a bare ``{"detail": "Not Found"}``, which SillyTavern shows as
"Failed to caption image" with nothing that points at the URL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import ClientSession

from tests.support.images import data_url
from tests.support.serving import running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

CHAT = {
    "model": "gpt-4-turbo",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},
                {"type": "image_url", "image_url": {"url": data_url(3)}},
            ],
        }
    ],
}


@pytest.mark.parametrize(
    ("method", "path", "meant"),
    [
        ("POST", "/v1//chat/completions", "/v1/chat/completions"),  # base "http://host:54880/v1/"
        ("POST", "/v1/v1/chat/completions", "/v1/chat/completions"),  # /v1 in the base and the tool
        ("POST", "/v1/chat/completions/", "/v1/chat/completions"),
        ("GET", "/v1//models", "/v1/models"),  # SillyTavern's connection check with that base
    ],
)
async def test_openai_paths_name_the_route_meant(tmp_path: Path, method: str, path: str, meant: str) -> None:
    async with (
        running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url,
        ClientSession() as session,
    ):
        body = CHAT if method == "POST" else None
        async with session.request(method, url + path, json=body) as response:
            assert str(response.url).endswith(path)  # sent as typed, not tidied by the client
            reply = await response.json()
            assert response.status == 404
    error = reply["error"]  # in the OpenAI shape, so the SDKs show the message
    assert error["type"] == "not_found_error" and error["code"] == "not_found"
    assert f"did you mean {meant}?" in error["message"] and "base URL" in error["message"]


async def test_native_paths_too_and_other_404s_stay_as_before(tmp_path: Path) -> None:
    async with (
        running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url,
        ClientSession() as session,
    ):
        # "//": a base URL ending in "/"; "/v1/": the OpenAI base URL given to a native client
        # (vision-client --url http://host:54880/v1)
        for path in ("//process_image", "/v1/process_image"):
            async with session.post(url + path, json={"image": "x"}) as response:
                assert response.status == 404
                assert "did you mean /process_image?" in (await response.json())["detail"], path
        async with session.get(url + "/nowhere") as response:  # nothing served is near it
            assert response.status == 404 and await response.json() == {"detail": "Not Found"}
        for path in ("/v1/nowhere", "/v1//nowhere"):  # under /v1/, where OpenAI clients call: their shape
            async with session.get(url + path) as response:
                assert response.status == 404, path
                error = (await response.json())["error"]
                assert error["message"] == "Not Found" and error["type"] == "not_found_error", path


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/conversations"),
        ("POST", "/v1/embeddings"),
        ("POST", "/completions"),
        ("GET", "/v1/files"),
    ],
)
async def test_other_openai_apis_say_what_to_call_instead(tmp_path: Path, method: str, path: str) -> None:
    """OpenAI's other APIs (embeddings, files, conversations, …) got a bare {"detail": "Not Found"};
    now an OpenAI-shaped 404 that points at chat completions and responses."""
    async with (
        running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url,
        ClientSession() as session,
    ):
        async with session.request(method, url + path, json={"model": "x", "input": "hi"}) as response:
            assert response.status == 404
            error = (await response.json())["error"]
    assert error["type"] == "not_found_error" and error["code"] == "not_found"
    assert "POST /v1/chat/completions" in error["message"] and path in error["message"]
    assert "POST /v1/responses" in error["message"]
