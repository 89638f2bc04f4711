"""BLIP, GIT, ViT+GPT-2 and Idefics3 served through every API family, against transformers itself.

Each family's tiny random model is served with ``--backend auto`` (the family is read from its
config.json); every answer must equal what the Hugging Face model gives when called directly
with ``generate`` (:mod:`tests.support.generic_reference`) for the same image, prompt and options.
The images are sent at the models' input size (32x32), so the server's resize changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import ClientSession, FormData

from tests.support.generic_reference import reference_caption
from tests.support.images import encode, noise, to_b64
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.testing.tiny_generic import FAMILIES, SIDE

PROMPT = "a red cat"  # a caption's start for BLIP and GIT, a question for Idefics3
TAKES_PROMPT = {"blip": True, "git": True, "vision-encoder-decoder": False, "idefics3": True}
SETTINGS: dict[str, Any] = {"max_new_tokens": 10, "num_beams": 2, "idle_timeout": -1}


def picture(seed: int) -> Any:
    return noise(seed, (SIDE, SIDE))


def settings_for(directory: Path, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(model=(str(directory),), cache_dir=tmp_path / "cache", **{**SETTINGS, **overrides})


async def post_json(session: ClientSession, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("family", FAMILIES)
async def test_every_api_family_answers_what_transformers_generates(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    directory = generic_model_dirs[family]
    beams: dict[str, Any] = {"num_beams": 2, "do_sample": False}
    prompted = PROMPT if TAKES_PROMPT[family] else None
    async with client_for(settings_for(directory, tmp_path)) as session:
        async with session.get("/prompts") as response:
            assert await response.json() == ["<CAPTION>"]

        # native: the task token, with the server's default options (10 tokens, 2 beams)
        status, body = await post_json(
            session, "/process_image", {"image": to_b64(encode(picture(1))), "prompt": "<CAPTION>"}
        )
        assert status == 200, body
        expected = reference_caption(directory, family, picture(1), max_new_tokens=10, **beams)
        assert expected and body["result"] == expected

        # native: free text reaches a model that reads it
        if TAKES_PROMPT[family]:
            status, body = await post_json(
                session, "/process_image", {"image": to_b64(encode(picture(1))), "prompt": PROMPT}
            )
            assert status == 200, body
            with_prompt = reference_caption(directory, family, picture(1), PROMPT, max_new_tokens=10, **beams)
            assert body["result"] == with_prompt != expected

        # OpenAI: the message text is the prompt (a model without prompts gets its one task)
        content = [
            {"type": "text", "text": PROMPT},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + to_b64(encode(picture(2)))},
            },
        ]
        chat = {"model": "x", "max_tokens": 6, "messages": [{"role": "user", "content": content}]}
        status, body = await post_json(session, "/v1/chat/completions", chat)
        assert status == 200, body
        answer = body["choices"][0]
        expected = reference_caption(directory, family, picture(2), prompted, max_new_tokens=6, **beams)
        assert answer["message"]["content"] == expected
        assert 0 < body["usage"]["completion_tokens"] <= 6
        assert answer["finish_reason"] == ("length" if body["usage"]["completion_tokens"] == 6 else "stop")

        # multipart: prompt as a form field, greedy, and a confidence in (0, 1]
        form = FormData()
        form.add_field("image", encode(picture(3)), filename="p.png", content_type="image/png")
        for key, value in {"prompt": PROMPT, "num_beams": "1", "max_new_tokens": "7"}.items():
            form.add_field(key, value)
        async with session.post("/caption", data=form) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        greedy = {"num_beams": 1, "do_sample": False}
        assert body["caption"] == reference_caption(
            directory, family, picture(3), prompted, max_new_tokens=7, **greedy
        )
        assert 0 < body["confidence"] <= 1
        assert body["model_info"]["model_type"] == family


async def test_several_images_in_one_request_get_each_its_own_caption(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Their jobs batch as the engine sees fit (one shared generate call is checked in-process,
    tests/system/test_generic_captioner.py); whatever the grouping, each gets the direct answer."""
    directory = generic_model_dirs["git"]
    urls = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + to_b64(encode(picture(s)))}}
        for s in (4, 5, 6)
    ]
    chat = {"model": "x", "max_tokens": 5, "messages": [{"role": "user", "content": urls}]}
    async with client_for(settings_for(directory, tmp_path)) as session:
        status, body = await post_json(session, "/v1/chat/completions", chat)
    assert status == 200, body
    expected = [
        reference_caption(directory, "git", picture(s), max_new_tokens=5, num_beams=2) for s in (4, 5, 6)
    ]
    assert body["choices"][0]["message"]["content"] == "\n\n".join(expected)  # one reply, captions joined
    assert len(set(expected)) == 3


async def test_a_lone_unknown_task_token_is_a_400_not_a_question(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    async with client_for(settings_for(generic_model_dirs["blip"], tmp_path)) as session:
        status, body = await post_json(
            session, "/process_image", {"image": to_b64(encode(picture(1))), "prompt": "<OD>"}
        )
    assert status == 400 and "<CAPTION>" in body["detail"]


async def test_a_model_without_prompts_refuses_free_text_on_the_native_route(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The native API's prompt is a task there, as for Florence-2: 400 with the valid list."""
    async with client_for(settings_for(generic_model_dirs["vision-encoder-decoder"], tmp_path)) as session:
        status, body = await post_json(
            session, "/process_image", {"image": to_b64(encode(picture(1))), "prompt": PROMPT}
        )
    assert status == 400 and "<CAPTION>" in body["detail"]


async def test_unsupported_architecture_is_a_503_naming_the_supported_ones(tmp_path: Path) -> None:
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    async with client_for(settings_for(model, tmp_path)) as session:
        status, body = await post_json(
            session, "/process_image", {"image": to_b64(encode(picture(1))), "prompt": "caption"}
        )
        async with session.get("/health") as response:
            assert response.status == 200  # the server keeps serving
    assert status == 503
    message = body["detail"]
    assert "BertForMaskedLM" in message and "unsupported" in message
    for name in (
        "BlipForConditionalGeneration",
        "GitForCausalLM",
        "VisionEncoderDecoderModel",
        "Idefics3ForConditionalGeneration",
    ):
        assert name in message


async def test_sampling_draws_what_transformers_draws_from_the_same_seed(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """temperature > 0 samples (one beam): with torch's global generator seeded alike, the server's
    caption is the direct call's; another seed gives another caption."""
    directory = generic_model_dirs["git"]
    image = "data:image/png;base64," + to_b64(encode(picture(7)))
    content = [{"type": "image_url", "image_url": {"url": image}}]
    chat = {
        "model": "x",
        "max_tokens": 8,
        "temperature": 1.5,
        "messages": [{"role": "user", "content": content}],
    }
    sampled = []
    async with client_for(settings_for(directory, tmp_path)) as session:
        await post_json(
            session, "/v1/chat/completions", chat
        )  # loads the model (loading draws random numbers)
        for seed in (7, 8):
            torch.manual_seed(seed)  # the model thread draws from the same global generator
            status, body = await post_json(session, "/v1/chat/completions", chat)
            assert status == 200, body
            sampled.append(body["choices"][0]["message"]["content"])
    options: dict[str, Any] = {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 1.5,
        "top_p": 1.0,
        "num_beams": 1,
    }
    expected = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        expected.append(reference_caption(directory, "git", picture(7), **options))
    assert sampled == expected and expected[0] != expected[1]


@pytest.mark.parametrize("family", ["idefics3", "blip"])
async def test_stream_true_sends_the_caption_token_by_token(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Greedy decoding streams: the pieces add up to the caption a plain request gets."""
    directory = generic_model_dirs[family]
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + to_b64(encode(picture(8)))}}
    ]
    chat = {"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
    async with client_for(settings_for(directory, tmp_path, num_beams=1)) as session:
        status, body = await post_json(session, "/v1/chat/completions", chat)
        assert status == 200, body
        async with session.post("/v1/chat/completions", json={**chat, "stream": True}) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            lines = [raw.decode().strip() async for raw in response.content]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    pieces = [piece for piece in pieces if piece]
    caption = body["choices"][0]["message"]["content"]
    assert caption == reference_caption(directory, family, picture(8), max_new_tokens=8, num_beams=1)
    assert len(pieces) > 2 and "".join(pieces) == caption


async def test_a_prompted_blip_reply_streams_in_one_piece_that_starts_with_the_prompt(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    directory = generic_model_dirs["blip"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + to_b64(encode(picture(9)))}}
    content = [{"type": "text", "text": PROMPT}, image]
    chat = {"model": "x", "max_tokens": 6, "messages": [{"role": "user", "content": content}]}
    async with client_for(settings_for(directory, tmp_path, num_beams=1)) as session:
        async with session.post("/v1/chat/completions", json={**chat, "stream": True}) as response:
            assert response.status == 200
            lines = [raw.decode().strip() async for raw in response.content]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    expected = reference_caption(directory, "blip", picture(9), PROMPT, max_new_tokens=6, num_beams=1)
    assert [piece for piece in pieces if piece] == [expected] and expected.startswith(PROMPT)
