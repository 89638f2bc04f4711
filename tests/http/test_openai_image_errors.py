"""An image the server refuses is named in the OpenAI error's ``param``, as the docs promise.

A request may carry several images among its messages; "Invalid image data" with ``param: null``
left the client to guess which one. Streaming requests are refused before the stream opens, so
they name it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.images import b64, data_url
from tests.support.serving import running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

NOT_AN_IMAGE = "data:image/png;base64,aGVsbG8gd29ybGQ="  # "hello world"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


async def refusal(settings: Settings, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with running_server(settings, FakeCaptioner()) as url, ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            return response.status, (await response.json())["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_bad_one_of_several_images_is_named(tmp_path: Path, stream: bool) -> None:
    body = {
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You describe images."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe these."},
                    image_part(data_url(1)),
                    image_part(NOT_AN_IMAGE),
                ],
            },
        ],
    }
    status, error = await refusal(Settings(cache_dir=tmp_path), body)
    assert status == 400 and error["code"] == "invalid_image"
    assert error["param"] == "messages[1].content[2].image_url"


async def test_a_single_streamed_image_is_named_too(tmp_path: Path) -> None:
    body = {"stream": True, "messages": [{"role": "user", "content": [image_part(NOT_AN_IMAGE)]}]}
    status, error = await refusal(Settings(cache_dir=tmp_path), body)
    assert status == 400 and error["param"] == "messages[0].content[0].image_url"


async def test_an_image_over_the_pixel_limit_is_named(tmp_path: Path) -> None:
    big = f"data:image/png;base64,{b64(2, size=(200, 200))}"
    body = {"messages": [{"role": "user", "content": [image_part(data_url(3)), image_part(big)]}]}
    status, error = await refusal(Settings(cache_dir=tmp_path, max_image_pixels=10_000), body)
    assert status == 413 and error["param"] == "messages[0].content[1].image_url"
