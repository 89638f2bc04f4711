"""A request picks its model by name, in every API family (issue #16).

A server with one model keeps taking whatever name OpenAI-style clients send (SillyTavern sends
``gpt-4-turbo`` unless told otherwise); lookups that name a model are exact; the default
model's listings stay byte for byte what they were before several models could be served.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientSession, FormData

from tests.support.images import b64, data_url, image_bytes
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

SETTINGS = Settings(idle_timeout=-1)


def chat(model: Any, seed: int = 1, text: str = "<CAPTION>") -> dict[str, Any]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(seed)}}]
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def upload(seed: int = 1, **fields: str) -> FormData:
    form = FormData()
    form.add_field("image", image_bytes(seed), filename="a.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def answer(session: ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, path, **kwargs) as response:
        return response.status, await response.json()


# --- one model: every name goes to it ----------------------------------------------------------


async def test_one_model_takes_any_name_in_every_family() -> None:
    async with client_for(SETTINGS, FakeCaptioner()) as session:
        status, native = await answer(
            session, "POST", "/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}
        )
        assert status == 200
        for model in ("fake-model", "gpt-4-turbo", "", None):
            body = {"image": b64(1), "prompt": "<CAPTION>", "model": model}
            assert await answer(session, "POST", "/process_image", json=body) == (200, native)
            status, reply = await answer(session, "POST", "/v1/chat/completions", json=chat(model))
            assert status == 200 and reply["choices"][0]["message"]["content"] == native["result"]
            assert reply["model"] == "fake-model"  # the model that captioned, whatever was asked
            extras = {"image": b64(1), "prompt": "<CAPTION>", "model": model}
            assert await answer(session, "POST", "/api/caption", json=extras) == (
                200,
                {"caption": native["result"]},
            )
            form = upload(1) if model is None else upload(1, model=model)
            status, reply = await answer(session, "POST", "/caption", data=form)
            assert status == 200 and reply["caption"] == native["result"]
            assert reply["model_info"]["model"] == "fake-model"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "shape"),
    [
        ("POST", "/process_image", {"json": {"image": b64(1), "prompt": "<CAPTION>", "model": 7}}, "detail"),
        ("POST", "/v1/chat/completions", {"json": chat(["a"])}, "openai"),
        ("POST", "/api/caption", {"json": {"image": b64(1), "model": {"name": "x"}}}, "error"),
        ("POST", "/v1/model/load", {"json": {"model": 1}}, "ops"),
    ],
)
async def test_a_model_that_is_not_a_string_is_a_400_that_says_so(
    method: str, path: str, kwargs: dict[str, Any], shape: str
) -> None:
    async with client_for(SETTINGS, FakeCaptioner()) as session:
        status, body = await answer(session, method, path, **kwargs)
    assert status == 400
    message = {
        "detail": lambda: body["detail"],
        "openai": lambda: body["error"]["message"],
        "error": lambda: body["error"],
        "ops": lambda: body["error"]["message"],
    }[shape]()
    assert "'model' must be a string naming a served model" in message
    if shape == "openai":
        assert body["error"]["param"] == "model"


# --- lookups are exact -------------------------------------------------------------------------


async def test_lookups_name_the_model_exactly() -> None:
    async with client_for(SETTINGS, FakeCaptioner()) as session:
        prompts = await answer(session, "GET", "/prompts")
        assert await answer(session, "GET", "/prompts?model=fake-model") == prompts
        status, body = await answer(session, "GET", "/prompts?model=gpt-4-turbo")
        assert status == 404
        assert body == {"detail": "The model 'gpt-4-turbo' is not served here; this server has 'fake-model'."}
        status, body = await answer(session, "GET", "/tasks?model=nope")
        assert status == 404 and "'fake-model'" in body["detail"]
        status, body = await answer(session, "GET", "/model_info?model=fake-model")
        assert status == 200 and body["model"] == "fake-model"

        status, body = await answer(session, "GET", "/v1/models/gpt-4-turbo")
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert body["error"]["type"] == "invalid_request_error"  # what OpenAI itself answers
        assert "'fake-model'" in body["error"]["message"]
        status, body = await answer(session, "GET", "/v1/models/fake-model")
        assert status == 200 and body["id"] == "fake-model"

        status, body = await answer(session, "POST", "/v1/model/load?model=other")
        assert status == 404
        assert body["error"]["code"] == "model_not_found" and "'fake-model'" in body["error"]["message"]
        status, body = await answer(session, "POST", "/v1/model/load", json={"model": "fake-model"})
        assert status == 200 and body["state"] == "ready"
        status, body = await answer(session, "POST", "/v1/model/unload?model=fake-model")
        assert status == 200 and body["state"] == "unloaded"
        status, body = await answer(session, "POST", "/v1/model/load", data=b"model=fake-model")
        assert status == 400 and "not valid JSON" in body["error"]["message"]


# --- the default model's listings, byte for byte as before ------------------------------------

# Captured from the server before it could serve several models (commit c7cdf6a), FakeCaptioner().
BEFORE = {
    "/prompts": b'["<GENERATE_TAGS>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", '
    b'"<ANALYZE>", "<MIXED_CAPTION>", "<MIXED_CAPTION_PLUS>"]',
    "/model": b'"fake-model"',
}


async def test_prompts_and_model_answer_byte_for_byte_as_before() -> None:
    async with client_for(SETTINGS, FakeCaptioner()) as session:
        for path, before in BEFORE.items():
            async with session.get(path) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "application/json; charset=utf-8"
                assert await response.read() == before
