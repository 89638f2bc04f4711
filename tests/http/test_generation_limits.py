"""A model's own limit on generated tokens: the default is stopped there, an explicit ask past it is a 400.

Real BLIP's text decoder holds 512 positions, under the server's default ``--max-new-tokens``
(1024); generating past them fails inside transformers (IndexError), which used to reach clients
as a 500. The BLIP here holds 48 (the same failure, reached in a second). The tiny Florence-2's
decoder holds 1024, so it needs a server started with more than that to show the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, FormData

from tests.support.images import encode, noise, to_b64
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.testing.tiny_generic import SIDE, build_generic_model
from vision_server.testing.tiny_model import build_test_model

BLIP_POSITIONS = 48


def image_b64(seed: int, side: int = SIDE) -> str:
    return to_b64(encode(noise(seed, (side, side))))


def chat(max_tokens: int | None, text: str = "Describe it.", side: int = SIDE) -> dict[str, Any]:
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(4, side)}},
    ]
    body: dict[str, Any] = {"model": "x", "messages": [{"role": "user", "content": content}]}
    return body if max_tokens is None else {**body, "max_tokens": max_tokens}


async def post_json(session: ClientSession, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


@pytest.fixture(scope="module")
def short_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BLIP with a text decoder of :data:`BLIP_POSITIONS` positions."""
    out = tmp_path_factory.mktemp("short-blip") / "model"
    return build_generic_model(out, "blip", text_positions=BLIP_POSITIONS)


async def test_blip_under_the_default_max_new_tokens_answers_and_refuses_explicit_excess(
    short_blip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vision_server.generic.captioner")
    directory = short_blip
    settings = Settings(model=(str(directory),), cache_dir=tmp_path / "cache", idle_timeout=-1, num_beams=1)
    assert settings.max_new_tokens > BLIP_POSITIONS  # the server's default, untouched
    async with client_for(settings) as session:
        # The default options: generation stops at the model's limit instead of failing.
        status, body = await post_json(
            session, "/process_image", {"image": image_b64(1), "prompt": "<CAPTION>"}
        )
        assert status == 200, body
        said = [r.getMessage() for r in caplog.records if "generates at most" in r.getMessage()]
        assert len(said) == 1 and f"at most {BLIP_POSITIONS} tokens" in said[0], said

        async with session.get("/model_info") as response:
            generation = (await response.json())["generation"]
        assert generation["max_new_tokens"] == generation["max_new_tokens_limit"] == BLIP_POSITIONS

        # Asking for more than the model can give: a 400 naming the limit and the model.
        status, body = await post_json(session, "/v1/chat/completions", chat(BLIP_POSITIONS + 1))
        assert status == 400, body
        message = body["error"]["message"]
        assert body["error"]["param"] == "max_tokens"
        assert str(BLIP_POSITIONS) in message and f"model '{directory.name}'" in message

        form = FormData()
        form.add_field("image", encode(noise(2, (SIDE, SIDE))), filename="a.png")
        form.add_field("max_new_tokens", "2000")
        async with session.post("/caption", data=form) as response:
            assert response.status == 400
            assert str(BLIP_POSITIONS) in (await response.json())["detail"]

        # Exactly the limit, with a prompt that takes some of it: the caption stops where the
        # decoder is full (prompt included), and the reply is a 200.
        status, body = await post_json(session, "/v1/chat/completions", chat(BLIP_POSITIONS, "a red cat"))
        assert status == 200, body
        usage = body["usage"]
        assert usage["completion_tokens"] <= BLIP_POSITIONS - usage["prompt_tokens"] + 1

        # A prompt that fills the decoder by itself leaves no room: a 400 that says so.
        status, body = await post_json(session, "/v1/chat/completions", chat(None, "a " * BLIP_POSITIONS))
        assert status == 400, body
        assert "shorter prompt" in body["error"]["message"]


@pytest.fixture(scope="module")
def endless_florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Florence-2 that never ends a caption by itself (it runs to any token budget)."""
    return build_test_model(tmp_path_factory.mktemp("endless") / "model", wordy=False)


async def test_florence_under_a_larger_max_new_tokens_stops_at_its_decoder(
    endless_florence: Path, tmp_path: Path
) -> None:
    settings = Settings(
        model=(str(endless_florence),),
        cache_dir=tmp_path / "cache",
        idle_timeout=-1,
        num_beams=1,
        max_new_tokens=1100,  # more than its decoder's 1024 positions
    )
    async with client_for(settings) as session:
        status, body = await post_json(
            session, "/process_image", {"image": image_b64(1, 64), "prompt": "<CAPTION>"}
        )
        assert status == 200, body
        status, body = await post_json(session, "/v1/chat/completions", chat(1025, side=64))
        assert status == 400, body
        assert "1024" in body["error"]["message"]
        status, body = await post_json(session, "/v1/chat/completions", chat(1024, side=64))
        assert status == 200, body
        assert body["usage"]["completion_tokens"] <= 1024
        assert body["choices"][0]["finish_reason"] == "length"


async def test_the_limit_is_known_from_config_json_before_the_model_loads(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The standard tiny BLIP (512 positions, like Salesforce's): refused before anything loads."""
    directory = generic_model_dirs["blip"]
    async with client_for(Settings(model=(str(directory),), cache_dir=tmp_path / "cache")) as session:
        status, body = await post_json(session, "/v1/chat/completions", chat(513))
        assert status == 400, body
        assert (
            f"'max_tokens' asks for 513 tokens; model '{directory.name}' generates at most 512"
            in (body["error"]["message"])
        )
        assert str(directory) not in body["error"]["message"]  # no path of the server's disk
        async with session.get("/model_info") as response:
            info = await response.json()
        assert info["state"] == "unloaded"
        assert info["generation"]["max_new_tokens"] == info["generation"]["max_new_tokens_limit"] == 512
