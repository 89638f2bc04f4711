"""A request picks its model by name, in every API family (issue #16).

A server with one model keeps taking whatever name OpenAI-style clients send (SillyTavern sends
``gpt-4-turbo`` unless told otherwise); lookups that name a model are exact; the default
model's listings stay byte for byte what they were before several models could be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, FormData
from PIL import Image

from tests.support.gallery_data import make_gallery
from tests.support.images import b64, data_url, image_bytes
from tests.support.serving import client_for, running_app
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.client import AsyncVisionClient, RequestRejected, caption_folder
from vision_server.engine.models import NamedModel
from vision_server.images import PixelSpec, fit_image
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
        assert status == 404 and "'gpt-4-turbo'" in body["detail"] and "fake-model" in body["detail"]
        status, body = await answer(session, "GET", "/tasks?model=nope")
        assert status == 404 and "fake-model" in body["detail"]
        status, body = await answer(session, "GET", "/model_info?model=fake-model")
        assert status == 200 and body["model"] == "fake-model"

        status, body = await answer(session, "GET", "/v1/models/gpt-4-turbo")
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert body["error"]["type"] == "invalid_request_error"  # what OpenAI itself answers
        assert "fake-model" in body["error"]["message"]
        status, body = await answer(session, "GET", "/v1/models/fake-model")
        assert status == 200 and body["id"] == "fake-model"

        status, body = await answer(session, "POST", "/v1/model/load?model=other")
        assert status == 404
        assert body["error"]["code"] == "model_not_found" and "fake-model" in body["error"]["message"]
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


# --- several models: each request gets the model it named ----------------------------------------

ALPHA_SPEC = PixelSpec(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BETA_SPEC = PixelSpec(height=8, width=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BETA_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>")


def two_fakes() -> list[NamedModel]:
    """``alpha`` (the default: PromptGen's tasks, 16x16) and ``beta`` (two tasks, 24x8), each
    answering with captions of its own."""
    alpha = FakeCaptioner(model_id="fake-alpha", spec=ALPHA_SPEC)
    beta = FakeCaptioner(model_id="fake-beta", tasks=BETA_TASKS, spec=BETA_SPEC)
    return [
        NamedModel("alpha", alpha, source="hub/alpha-source"),
        NamedModel("beta", beta, source="hub/beta-source", adapter="adapters/beta"),
    ]


def expected(model: str, seed: int | bytes, task: str = "<CAPTION>") -> str:
    """What the fake named ``model`` answers for image ``seed`` (or these bytes): its caption of
    the image fitted to its own input size (a wrong size or a wrong model gives another caption)."""
    spec, model_id = (ALPHA_SPEC, "fake-alpha") if model == "alpha" else (BETA_SPEC, "fake-beta")
    data = image_bytes(seed) if isinstance(seed, int) else seed
    image = fit_image(Image.open(io.BytesIO(data)).convert("RGB"), spec)
    return FakeCaptioner.expected(CaptionItem(image, task, GenerationOptions()), model_id)


@contextlib.asynccontextmanager
async def several(models: list[NamedModel] | None = None) -> AsyncIterator[ClientSession]:
    async with running_app(SETTINGS, models=models or two_fakes()) as (_, url), ClientSession(url) as session:
        yield session


async def stream_text(session: ClientSession, body: dict[str, Any]) -> tuple[str, set[str]]:
    """The streamed content, and the model names the chunks carry."""
    async with session.post("/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        lines = [line for line in (await response.text()).splitlines() if line.startswith("data: {")]
    chunks = [json.loads(line[len("data: ") :]) for line in lines]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, {chunk["model"] for chunk in chunks}


@pytest.mark.parametrize(
    ("asked", "model"),
    [("alpha", "alpha"), ("beta", "beta"), (None, "alpha"), ("", "alpha"), ("hub/beta-source", "beta")],
)
async def test_every_family_captions_with_the_model_it_names(asked: str | None, model: str) -> None:
    want = expected(model, 3)
    async with several() as session:
        native = {"image": b64(3), "prompt": "<CAPTION>", "model": asked}
        assert await answer(session, "POST", "/process_image", json=native) == (200, {"result": want})

        status, reply = await answer(session, "POST", "/v1/chat/completions", json=chat(asked, 3))
        assert status == 200 and reply["choices"][0]["message"]["content"] == want
        assert reply["model"] == model
        assert await stream_text(session, chat(asked, 3)) == (want, {model})

        extras = {"image": b64(3), "prompt": "<CAPTION>", "model": asked}
        assert await answer(session, "POST", "/api/caption", json=extras) == (200, {"caption": want})

        form = upload(3) if asked is None else upload(3, model=asked)
        status, reply = await answer(session, "POST", "/caption", data=form)
        assert status == 200 and reply["caption"] == want and reply["model_info"]["model"] == model
        batch = FormData()
        for seed in (3, 4):
            batch.add_field("images", image_bytes(seed), filename=f"{seed}.png", content_type="image/png")
        if asked is not None:
            batch.add_field("model", asked)
        status, reply = await answer(session, "POST", "/batch_caption", data=batch)
        assert status == 200
        assert [r["caption"] for r in reply["results"]] == [want, expected(model, 4)]


async def test_mixed_requests_at_once_each_get_their_own_models_caption() -> None:
    async with several() as session:
        replies = await asyncio.gather(
            *(
                answer(
                    session,
                    "POST",
                    "/process_image",
                    json={"image": b64(seed), "prompt": "<CAPTION>", "model": model},
                )
                for seed in range(5, 9)
                for model in ("alpha", "beta")
            )
        )
    assert replies == [(200, {"result": expected(m, s)}) for s in range(5, 9) for m in ("alpha", "beta")]


UNKNOWN = "gpt-4-turbo"  # what SillyTavern sends unless told otherwise
MESSAGE_OF: dict[str, Callable[[Any], str]] = {
    "detail": lambda body: body["detail"],
    "openai": lambda body: body["error"]["message"],
    "extras": lambda body: body["error"],
    "ops": lambda body: body["error"]["message"],
}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "shape"),
    [
        ("POST", "/process_image", {"json": {"image": b64(1), "prompt": "<CAPTION>", "model": UNKNOWN}},
         "detail"),
        ("POST", "/v1/chat/completions", {"json": chat(UNKNOWN)}, "openai"),
        ("POST", "/chat/completions", {"json": {**chat(UNKNOWN), "stream": True}}, "openai"),
        ("POST", "/api/caption", {"json": {"image": b64(1), "model": UNKNOWN}}, "extras"),
        ("POST", "/caption", {"data": upload(1, model=UNKNOWN)}, "detail"),
        ("GET", f"/prompts?model={UNKNOWN}", {}, "detail"),
        ("GET", f"/tasks?model={UNKNOWN}", {}, "detail"),
        ("GET", f"/model_info?model={UNKNOWN}", {}, "detail"),
        ("GET", f"/v1/models/{UNKNOWN}", {}, "openai"),
        ("POST", f"/v1/model/load?model={UNKNOWN}", {}, "ops"),
    ],
)  # fmt: skip
async def test_an_unknown_name_is_a_404_in_the_familys_shape_listing_the_served_names(
    method: str, path: str, kwargs: dict[str, Any], shape: str
) -> None:
    models = two_fakes()
    async with several(models) as session:
        status, body = await answer(session, method, path, **kwargs)
        status_now = await answer(session, "GET", "/v1/status")
    assert status == 404
    message = MESSAGE_OF[shape](body)
    assert UNKNOWN in message and "alpha" in message and "beta" in message
    if shape == "openai":
        assert body["error"]["code"] == "model_not_found" and body["error"]["type"] == "invalid_request_error"
    if shape == "ops":
        assert body["error"]["code"] == "model_not_found"
    assert all(not named.captioner.loads for named in models)  # type: ignore[attr-defined]
    assert status_now[1]["queue_depth"] == 0


async def test_a_source_that_several_models_share_is_a_404_that_names_them() -> None:
    """Two models on one base (say, two adapters) share its source, which then picks neither: the
    404 said the server "does not serve" the model it serves twice, now it names both to pick from."""
    models = [
        NamedModel("plain", FakeCaptioner(model_id="fake-alpha"), source="hub/base"),
        NamedModel("styled", FakeCaptioner(model_id="fake-beta"), source="hub/base", adapter="adapters/s"),
        NamedModel("other", FakeCaptioner(model_id="fake-other"), source="hub/other"),
    ]
    async with several(models) as session:
        status, body = await answer(session, "POST", "/v1/chat/completions", json=chat("hub/base"))
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        assert body["error"]["message"].startswith(
            "'hub/base' is the source of several served models (plain, styled): name one of them."
        )
        assert (await answer(session, "POST", "/v1/chat/completions", json=chat("hub/other")))[0] == 200


async def test_tasks_and_free_text_follow_the_chosen_model() -> None:
    async with several() as session:
        # alpha has <GENERATE_TAGS>, beta does not: the 400 lists beta's own tasks
        tags = {"image": b64(2), "prompt": "<GENERATE_TAGS>"}
        status, body = await answer(session, "POST", "/process_image", json={**tags, "model": "alpha"})
        assert (status, body) == (200, {"result": expected("alpha", 2, "<GENERATE_TAGS>")})
        status, body = await answer(session, "POST", "/process_image", json={**tags, "model": "beta"})
        assert status == 400 and "<DETAILED_CAPTION>" in body["detail"] and "<ANALYZE>" not in body["detail"]
        status, body = await answer(session, "POST", "/caption", data=upload(2, model="beta", task="ANALYZE"))
        assert status == 400 and "<DETAILED_CAPTION>" in body["detail"]

        # words pick among the chosen model's tasks; a task the model lacks is skipped
        for model, words, task in (
            ("beta", "a structured caption", "<DETAILED_CAPTION>"),
            ("alpha", "in detail please", "<MORE_DETAILED_CAPTION>"),
            ("beta", "in detail please", "<CAPTION>"),
        ):
            status, body = await answer(session, "POST", "/v1/chat/completions", json=chat(model, 2, words))
            assert body["choices"][0]["message"]["content"] == expected(model, 2, task), (model, words)


async def test_listings_name_every_model_and_the_defaults_stay_as_before() -> None:
    async with several() as session:
        status, listed = await answer(session, "GET", "/v1/models")
        assert status == 200 and listed["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [
            ("alpha", "model", "vision-server"),
            ("beta", "model", "vision-server"),
        ]
        assert [
            (m["source"], m["adapter"], m["family"], m["state"], m["default"]) for m in listed["data"]
        ] == [
            ("hub/alpha-source", None, "florence-2", "unloaded", True),
            ("hub/beta-source", "beta", "florence-2", "unloaded", False),  # its folder name, no path
        ]
        assert await answer(session, "GET", "/v1/models/beta") == (200, listed["data"][1])
        assert await answer(session, "GET", "/models/hub/beta-source") == (200, listed["data"][1])

        assert await answer(session, "GET", "/prompts?model=beta") == (200, list(BETA_TASKS))
        status, tasks = await answer(session, "GET", "/tasks?model=beta")
        assert [t["task"] for t in tasks["tasks"]] == list(BETA_TASKS)
        status, info = await answer(session, "GET", "/model_info?model=beta")
        assert (info["model"], info["tasks"], info["state"]) == ("fake-beta", list(BETA_TASKS), "unloaded")
        assert info["adapter"] == {"name": "beta", "training": None}

        # without ?model= the default model, byte for byte as before several models
        async with session.get("/prompts") as response:
            assert await response.read() == BEFORE["/prompts"]
        async with session.get("/model") as response:
            assert await response.read() == b'"fake-alpha"'


async def test_admin_routes_act_on_the_model_they_name_and_status_shows_each() -> None:
    async with several() as session:
        status, body = await answer(session, "POST", "/v1/model/load?model=beta")
        assert status == 200
        states = {m["name"]: m["state"] for m in body["models"]}
        assert states == {"alpha": "unloaded", "beta": "ready"}
        _, health = await answer(session, "GET", "/health")  # model_loaded: the default model's
        assert (health["model_loaded"], health["models_loaded"]) == (False, ["beta"])
        status, body = await answer(session, "POST", "/v1/model/load")  # the default model
        assert {m["name"]: m["state"] for m in body["models"]} == {"alpha": "ready", "beta": "ready"}
        status, body = await answer(session, "POST", "/v1/model/unload", json={"model": "beta"})
        assert status == 200
        status, body = await answer(session, "GET", "/v1/status")
        assert {m["name"]: m["state"] for m in body["models"]} == {"alpha": "ready", "beta": "unloaded"}
        status, listed = await answer(session, "GET", "/v1/models")
        assert [m["state"] for m in listed["data"]] == ["ready", "unloaded"]
        status, info = await answer(session, "GET", "/model_info?model=alpha")
        assert (info["state"], info["device"]) == ("ready", "cpu")


# --- the real thing: tiny Florence-2, the same with an adapter, and a tiny BLIP in one server -----

WORDS = "a red cat"  # words that pick a task for Florence-2, a prompt for BLIP


async def every_family(session: ClientSession, model: str | None, seed: int) -> list[str]:
    """The caption of image ``seed`` through each family at once: native (a task), OpenAI and its
    stream, Extras and multipart (free text)."""
    named = {} if model is None else {"model": model}
    native, chat_reply, streamed, extras, form = await asyncio.gather(
        answer(session, "POST", "/process_image", json={"image": b64(seed), "prompt": "<CAPTION>", **named}),
        answer(session, "POST", "/v1/chat/completions", json=chat(model, seed, WORDS)),
        stream_text(session, chat(model, seed, WORDS)),
        answer(session, "POST", "/api/caption", json={"image": b64(seed), "prompt": WORDS, **named}),
        answer(session, "POST", "/caption", data=upload(seed, prompt=WORDS, **named)),
    )
    for status, body in (native, chat_reply, extras, form):
        assert status == 200, body
    return [
        native[1]["result"],
        chat_reply[1]["choices"][0]["message"]["content"],
        streamed[0],
        extras[1]["caption"],
        form[1]["caption"],
    ]


async def test_three_models_in_one_server_answer_as_each_alone(
    tiny: Settings, tiny_adapter_dir: Path, generic_model_dirs: dict[str, Path]
) -> None:
    """Concurrent mixed requests through every family get, from each name, the caption a server
    of that model alone gives: its own weights (the adapter changes them), task handling
    (Florence-2 reads the words as a task, BLIP as its prompt) and input size."""
    options: dict[str, Any] = {
        "max_new_tokens": 8,
        "num_beams": 2,
        "idle_timeout": -1,
        "cache_dir": tiny.cache_dir,
    }
    florence, blip = "test:tiny", str(generic_model_dirs["blip"])
    alone = {
        "florence": Settings(model=(florence,), **options),
        "styled": Settings(model=(florence,), adapter=str(tiny_adapter_dir), **options),
        "blip": Settings(model=(blip,), **options),
    }
    names = (f"florence={florence}", f"styled={florence}+{tiny_adapter_dir}", f"blip={blip}")
    together = Settings(model=names, **options)
    async with running_app(together) as (_, url), ClientSession(url) as session:
        mixed = await asyncio.gather(
            *(every_family(session, name, 31) for name in alone), every_family(session, None, 31)
        )
    expected_answers = {}
    for name, settings in alone.items():
        async with client_for(settings) as session:
            expected_answers[name] = await every_family(session, None, 31)
    assert mixed == [*expected_answers.values(), expected_answers["florence"]]  # no name: the first
    assert all(len({answers[i] for answers in expected_answers.values()}) == 3 for i in range(5))


async def test_the_web_page_offers_every_model_and_captions_with_the_chosen_one() -> None:
    async with several() as session:
        status, info = await answer(session, "GET", "/ui/api/info")
        assert status == 200 and info["default_model"] == "alpha"
        assert info["model"] == "fake-alpha" and len(info["tasks"]) == 7  # the default's, as before
        assert [(m["name"], m["source"], [t["task"] for t in m["tasks"]]) for m in info["models"]] == [
            ("alpha", "hub/alpha-source", [t["task"] for t in info["tasks"]]),
            ("beta", "hub/beta-source", list(BETA_TASKS)),
        ]
        status, reply = await answer(session, "POST", "/ui/api/caption", data=upload(6, model="beta"))
        assert status == 200 and (reply["model"], reply["caption"]) == ("beta", expected("beta", 6))
        status, reply = await answer(session, "POST", "/ui/api/caption", data=upload(6, task="<ANALYZE>"))
        assert status == 200 and (reply["model"], reply["caption"]) == (
            "alpha",
            expected("alpha", 6, "<ANALYZE>"),
        )


async def test_the_python_client_captions_with_the_model_it_was_given() -> None:
    async with running_app(SETTINGS, models=two_fakes()) as (_, url):
        async with AsyncVisionClient(url, model="beta", retries=0) as beta:
            assert await beta.caption(image_bytes(7), "CAPTION") == expected("beta", 7)
            assert await beta.prompts() == list(BETA_TASKS)
        async with AsyncVisionClient(url, retries=0) as default:
            assert await default.caption(image_bytes(7), "CAPTION") == expected("alpha", 7)
            assert (await default.caption_result(image_bytes(7), "CAPTION")).model == "alpha"
        async with AsyncVisionClient(url, model="hub/beta-source", retries=0) as by_source:
            answered = await by_source.caption_result(image_bytes(7), "CAPTION")
            assert (answered.text, answered.model) == (expected("beta", 7), "beta")  # the served name
        async with AsyncVisionClient(url, model=UNKNOWN, retries=0) as unknown:
            with pytest.raises(RequestRejected) as caught:
                await unknown.caption(image_bytes(7), "CAPTION")
    assert caught.value.status == 404 and "alpha" in str(caught.value) and UNKNOWN in str(caught.value)


async def test_folder_jsonl_rows_name_the_model_that_answered(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes(7))
    out = tmp_path / "captions.jsonl"
    async with running_app(SETTINGS, models=two_fakes()) as (_, url):
        for model, task in ((None, "CAPTION"), ("hub/beta-source", "DETAILED_CAPTION")):
            async with AsyncVisionClient(url, model=model, retries=0) as client:
                summary = await caption_folder(client, folder, task=task, jsonl=out)
            assert summary.done == 1
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["task"], row["model"]) for row in rows] == [
        ("<CAPTION>", "alpha"),  # no name asked: the default model answered
        ("<DETAILED_CAPTION>", "beta"),  # asked by its source, recorded by its served name
    ]
    assert rows[1]["caption"] == expected("beta", image_bytes(7), "<DETAILED_CAPTION>")


async def test_the_gallery_recaptions_with_the_chosen_model(tmp_path: Path) -> None:
    data = make_gallery(tmp_path)
    settings = Settings(idle_timeout=-1, cache_dir=tmp_path / "cache", gallery=data.root)
    picture = (data.root / "img03.png").read_bytes()
    async with running_app(settings, models=two_fakes()) as (_, url), ClientSession(url) as session:
        body = {"paths": ["img03.png"], "task": "detailed_caption", "model": "beta"}
        status, reply = await answer(session, "POST", "/ui/api/gallery/recaption", json=body)
        assert status == 200 and (reply["model"], reply["task"]) == ("beta", "<DETAILED_CAPTION>")
        caption = expected("beta", picture, "<DETAILED_CAPTION>")
        assert reply["results"] == [{"path": "img03.png", "task": "<DETAILED_CAPTION>", "caption": caption}]
        fresh = [s for s in reply["items"][0]["sources"] if s["kind"] == "model"]
        assert [(s["name"], s["text"]) for s in fresh] == [("beta <DETAILED_CAPTION>", caption)]

        status, reply = await answer(
            session, "POST", "/ui/api/gallery/recaption", json={"paths": ["img03.png"], "task": "caption"}
        )
        assert reply["results"][0]["caption"] == expected("alpha", picture)  # the default model
        status, reply = await answer(
            session, "POST", "/ui/api/gallery/recaption", json={**body, "task": "analyze"}
        )
        assert status == 400 and "<DETAILED_CAPTION>" in reply["error"]["message"]  # beta's tasks
        status, reply = await answer(
            session, "POST", "/ui/api/gallery/recaption", json={**body, "model": UNKNOWN}
        )
        assert status == 404 and reply["error"]["code"] == "model_not_found"
