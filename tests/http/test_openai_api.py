"""The OpenAI-compatible routes with the official SDK and raw requests, on the real tiny model.

Also the cross-family check: requests from every API family, sent together, share batches and
answer exactly what the native route answers for the same image and task.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from aiohttp import ClientSession, FormData
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionUserMessageParam

from tests.support.api import engine_status, native_caption
from tests.support.images import b64, data_url, image_bytes
from tests.support.serving import client_for, running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

QUESTION = "What's in this image?"


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-anything", max_retries=0)


def user(text: str | None, *images: Any) -> ChatCompletionUserMessageParam:
    parts: list[ChatCompletionContentPartParam] = [{"type": "text", "text": text}] if text is not None else []
    parts += [{"type": "image_url", "image_url": image} for image in images]
    return {"role": "user", "content": parts}


async def chat(session: ClientSession, body: object, path: str = "/v1/chat/completions") -> tuple[int, Any]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


# --- the SDK ----------------------------------------------------------------------------------------


async def test_sdk_gets_the_caption_with_parts_content(tiny: Settings) -> None:
    async with running_server(tiny) as url, ClientSession(url) as session:
        client = sdk(url)
        started = int(time.time())
        reply = await client.chat.completions.create(
            model="gpt-4o",
            messages=[user(QUESTION, {"url": data_url(1), "detail": "auto"})],
        )
        finished = int(time.time())
        await client.close()
        expected = await native_caption(session, 1, "<MORE_DETAILED_CAPTION>")  # the default task
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "test:tiny" and started <= reply.created <= finished
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_sdk_string_content_picks_the_task(tiny: Settings) -> None:
    async with running_server(tiny) as url, ClientSession(url) as session:
        client = sdk(url)
        reply = await client.chat.completions.create(
            model="any",
            messages=[
                {"role": "system", "content": "You caption images. <ANALYZE>"},  # system text is ignored
                user(None, {"url": data_url(2, "JPEG")}),
                {"role": "user", "content": "generate_tags"},
            ],
        )
        await client.close()
        async with session.post(
            "/process_image", json={"image": b64(2, "JPEG"), "prompt": "<GENERATE_TAGS>"}
        ) as r:
            expected = (await r.json())["result"]
    assert reply.choices[0].message.content == expected


async def test_sdk_streaming(tiny: Settings) -> None:
    async with running_server(tiny) as url, ClientSession(url) as session:
        client = sdk(url)
        stream = await client.chat.completions.create(
            model="any",
            messages=[user("<CAPTION>", {"url": data_url(3)})],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        expected = await native_caption(session, 3, "<CAPTION>")
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "stop" and finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0


async def test_sdk_lists_and_retrieves_the_model(tiny: Settings) -> None:
    async with running_server(tiny) as url:
        client = sdk(url)
        models = await client.models.list()
        assert [model.id for model in models.data] == ["test:tiny"]
        assert (await client.models.retrieve("test:tiny")).owned_by == "vision-server"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4")
        await client.close()


async def test_sdk_raises_bad_request_for_an_http_image_url(tiny: Settings) -> None:
    async with running_server(tiny, FakeCaptioner()) as url:
        client = sdk(url)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="any",
                messages=[user(QUESTION, {"url": "https://example.com/cat.png"})],
            )
        await client.close()
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert "data URL" in error["message"] and error["param"] == "messages[0].content[1].image_url"


# --- raw requests -----------------------------------------------------------------------------------


async def test_lenient_shapes_and_both_prefixes(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        expected = await native_caption(session, 4, "<CAPTION>")
        bodies = [
            {"messages": [user("short caption", data_url(4))]},  # image_url as a plain string
            {"messages": [user("<CAPTION>", {"url": b64(4)})]},  # bare base64
            {"model": "x", "messages": [user("brief please", {"url": data_url(4)})], "temperature": 0},
        ]
        calls = [
            chat(session, body, path)
            for path in ("/v1/chat/completions", "/chat/completions")
            for body in bodies
        ]
        for status, reply in await asyncio.gather(*calls):
            assert status == 200 and reply["choices"][0]["message"]["content"] == expected
        async with session.get("/models") as response:
            listed = await response.json()
        assert listed["object"] == "list" and listed["data"][0]["object"] == "model"
        assert set(listed["data"][0]) == {
            *("id", "object", "created", "owned_by"),  # OpenAI's
            *("source", "adapter", "family", "state", "default"),  # which model it is (issue #16)
        }


async def test_every_data_url_format(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        formats = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
        bodies = [{"messages": [user("<CAPTION>", {"url": data_url(5, fmt)})]} for fmt in formats]
        replies = await asyncio.gather(*(chat(session, body) for body in bodies))
    for fmt, (status, reply) in zip(formats, replies, strict=True):
        assert status == 200 and reply["choices"][0]["message"]["content"], fmt


async def test_max_tokens_sampling_and_unique_ids(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        messages = [user("<MORE_DETAILED_CAPTION>", {"url": data_url(6)})]
        bodies = [
            {"messages": messages},
            {"messages": messages, "max_tokens": 4},
            {"messages": messages, "max_completion_tokens": 4},
            {"messages": messages, "temperature": 0.9, "top_p": 0.9, "max_tokens": 12},
        ]
        (_, full), (status, short), (_, same), (sampled_status, sampled) = await asyncio.gather(
            *(chat(session, body) for body in bodies)
        )
    assert status == 200 and 0 < short["usage"]["completion_tokens"] <= 4
    assert short["choices"][0]["finish_reason"] == "length" and full["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    assert full["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])
    assert same["choices"][0]["message"]["content"] == short["choices"][0]["message"]["content"]
    assert same["id"] != short["id"]
    assert sampled_status == 200 and sampled["choices"][0]["message"]["content"]


async def test_max_tokens_counts_caption_tokens_only(tiny: Settings) -> None:
    """Florence-2 spends two of generate's tokens on its forced start and end tokens; a client's
    limit counts the caption's, as OpenAI counts completion tokens (1 gave an empty caption)."""
    async with client_for(tiny) as session:
        image = {"url": data_url(6)}
        replies = await asyncio.gather(
            *(
                chat(session, {"messages": [user("<MORE_DETAILED_CAPTION>", image)], field: tokens})
                for field in ("max_tokens", "max_completion_tokens")
                for tokens in (1, 2)
            )
        )
    for (status, reply), tokens in zip(replies, (1, 2, 1, 2), strict=True):
        words = reply["choices"][0]["message"]["content"].split()
        assert status == 200 and reply["usage"]["completion_tokens"] == tokens, reply
        assert reply["choices"][0]["finish_reason"] == "length" and 1 <= len(words) <= tokens, reply


async def test_several_images_are_captioned_in_order(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        first, second = await asyncio.gather(
            native_caption(session, 7, "<CAPTION>"), native_caption(session, 8, "<CAPTION>")
        )
        body = {"messages": [user("<CAPTION>", {"url": data_url(7)}, {"url": data_url(8)})]}
        status, reply = await chat(session, body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == f"{first}\n\n{second}"


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "words"),
    [
        ({"model": "x"}, 400, "invalid_request", "messages", "messages"),
        (
            {"messages": [{"role": "user", "content": QUESTION}]},
            400,
            "invalid_request",
            "messages",
            "No image",
        ),
        (
            {"messages": [user(QUESTION, {"url": "data:image/png;base64,@@@"})]},
            400,
            "invalid_image",
            None,
            "base64",
        ),
        ({"messages": [user(QUESTION, {"url": "http://x/y.png"})]}, 400, "invalid_request", None, "data URL"),
        (
            {"messages": [user("<OD>", {"url": "data:image/png;base64,AAAA"})]},
            400,
            "invalid_task",
            None,
            "<CAPTION>",
        ),
        ({"messages": [user(QUESTION, {"nope": 1})]}, 400, "invalid_request", None, "url"),
        (
            {"messages": [user(QUESTION, {"url": "AAAA"})], "max_tokens": 0},
            400,
            "invalid_request",
            "max_tokens",
            "",
        ),
        (
            {"messages": [user(QUESTION, {"url": "AAAA"})], "temperature": "hot"},
            400,
            "invalid_request",
            "temperature",
            "",
        ),
        ({"messages": [user(QUESTION, {"url": "AAAA"})], "n": 2}, 400, "invalid_request", "n", "n=1"),
        # Wrong JSON types are named, as OpenAI does, not parsed like a form field's text.
        *(
            (
                {"messages": [user(QUESTION, {"url": data_url(1)})], field: value},
                400,
                "invalid_request",
                param,
                words,
            )
            for field, value, param, words in (
                ("stream", "yes", "stream", "true or false"),
                ("stream", 1, "stream", "true or false"),
                ("max_tokens", "10", "max_tokens", "not a string"),
                ("max_completion_tokens", "10", "max_completion_tokens", "not a string"),
                ("temperature", "0.5", "temperature", "not a string"),
                ("top_p", "0.9", "top_p", "not a string"),
                ("n", "1", "n", "not a string"),
                ("n", True, "n", "not bool"),
                ("stream_options", "usage", "stream_options", "object"),
                (
                    "stream_options",
                    {"include_usage": "true"},
                    "stream_options.include_usage",
                    "true or false",
                ),
            )
        ),
        ({"messages": "hi"}, 400, "invalid_request", "messages", "list"),
    ],
)
async def test_errors_have_the_openai_shape(
    tmp_path: Any, body: object, status: int, code: str, param: str | None, words: str
) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        got_status, reply = await chat(session, body)
    assert got_status == status and set(reply) == {"error"}
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"] == code and words in error["message"]
    assert param is None or error["param"] == param


async def test_null_fields_count_as_not_given(tmp_path: Any) -> None:
    """The OpenAI SDK sends null for a parameter set to None; that stays 'not given', as before."""
    nulls = dict.fromkeys(
        ("stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream_options"), None
    )
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        status, reply = await chat(session, {"messages": [user(QUESTION, {"url": data_url(1)})], **nulls})
        assert status == 200 and reply["choices"][0]["message"]["content"], reply
        typed = {"stream": False, "max_tokens": 10.0, "temperature": 0, "n": 1, "stream_options": {}}
        status, reply = await chat(session, {"messages": [user(QUESTION, {"url": data_url(1)})], **typed})
        assert status == 200, reply


async def test_bad_json_and_too_large(tmp_path: Any) -> None:
    settings = Settings(cache_dir=tmp_path, max_request_bytes=50_000)
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.post(
            "/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"}
        ) as r:
            reply = await r.json()
            assert r.status == 400 and reply["error"]["type"] == "invalid_request_error"
        status, reply = await chat(session, {"messages": [user(QUESTION, {"url": "A" * 60_000})]})
        assert status == 413 and reply["error"]["code"] == "payload_too_large"
        async with session.get("/v1/nothing-here") as r:
            assert r.status == 404


async def test_queue_full_is_503_with_a_short_retry_after(tmp_path: Any) -> None:
    settings = Settings(cache_dir=tmp_path, max_queue=1, max_batch_size=1, max_batch_wait_ms=0)
    async with client_for(settings, FakeCaptioner(delay=0.5)) as session:
        body = {"messages": [user(QUESTION, {"url": data_url(1)})]}

        async def post() -> tuple[int, Any, str | None]:
            async with session.post("/v1/chat/completions", json=body) as r:
                return r.status, await r.json(), r.headers.get("Retry-After")

        # One runs, one waits in the queue of one: the other three are refused.
        results = await asyncio.gather(*(post() for _ in range(5)))
    refused = [(reply, retry_after) for status, reply, retry_after in results if status == 503]
    assert refused and 200 in [status for status, _, _ in results]
    for reply, retry_after in refused:
        assert retry_after is not None and 1 <= int(retry_after) <= 120
        assert reply["error"]["type"] == "api_error" and reply["error"]["code"] == "queue_full"


async def test_an_empty_bearer_token_is_accepted_without_a_key(tiny: Settings) -> None:
    async with client_for(tiny, FakeCaptioner()) as session:
        body = {"messages": [user(QUESTION, {"url": data_url(1)})]}
        async with session.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer "}) as r:
            assert r.status == 200


# --- every family in one batch ----------------------------------------------------------------------


async def test_all_families_batch_together_and_match_native(tiny: Settings) -> None:
    settings = Settings(
        model=tiny.model, cache_dir=tiny.cache_dir, idle_timeout=-1, max_batch_wait_ms=400, max_batch_size=32
    )
    cases = [(10, "<CAPTION>"), (11, "<GENERATE_TAGS>"), (12, "<MORE_DETAILED_CAPTION>"), (13, "<ANALYZE>")]
    async with client_for(settings) as session:
        natives = await asyncio.gather(*(native_caption(session, seed, task) for seed, task in cases))
        expected = dict(zip(cases, natives, strict=True))
        before = await engine_status(session)

        async def native(seed: int, task: str) -> str:
            async with session.post("/process_image", json={"image": b64(seed), "prompt": task}) as r:
                return str((await r.json())["result"])

        async def openai_family(seed: int, task: str) -> str:
            _, reply = await chat(session, {"messages": [user(task, {"url": data_url(seed)})]})
            return str(reply["choices"][0]["message"]["content"])

        async def extras(seed: int, task: str) -> str:
            async with session.post("/api/caption", json={"image": b64(seed), "prompt": task}) as r:
                return str((await r.json())["caption"])

        async def multipart(seed: int, task: str) -> str:
            form = FormData()
            form.add_field("image", image_bytes(seed), filename=f"{seed}.png", content_type="image/png")
            form.add_field("task", task)
            async with session.post("/caption", data=form) as r:
                return str((await r.json())["caption"])

        calls = [(family, case) for family in (native, openai_family, extras, multipart) for case in cases]
        answers = await asyncio.gather(*(family(*case) for family, case in calls))
        after = await engine_status(session)
    for (family, case), answer in zip(calls, answers, strict=True):
        assert answer == expected[case], (family.__name__, case)
    batches = after["batches_run"] - before["batches_run"]
    jobs = after["jobs_done"] - before["jobs_done"]
    assert jobs == len(calls) and batches < jobs / 2, (batches, jobs)


async def test_a_missing_key_is_a_401_in_the_openai_shape(tmp_path: Any) -> None:
    async with running_server(Settings(cache_dir=tmp_path, api_key="sekret"), FakeCaptioner()) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
        await client.close()
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert (await client.models.list()).data[0].id == "fake-model"
        await client.close()
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error" and caught.value.response.headers["WWW-Authenticate"]
