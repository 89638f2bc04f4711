"""OpenAI's Responses API (``POST /v1/responses``) with the official SDK and raw requests.

The SDK's ``client.responses.create`` (plain and ``stream=True``) and ``client.responses.stream``
get the caption the native route gives for the same image and task, on the real tiny model;
what the server cannot do (stored state, tools, JSON output, logprobs, files) is a 400 that
names the field; a stream that fails after it began ends with ``response.failed``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from aiohttp import ClientSession
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInputContentParam,
    ResponseInputParam,
    ResponseOutputItemAddedEvent,
    ResponseOutputText,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from tests.support.api import native_caption
from tests.support.images import data_url
from tests.support.serving import client_for, running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-anything", max_retries=0)


def said(text: str | None, *seeds: int) -> ResponseInputParam:
    """One user message: ``text`` as input_text, then each seed's image as input_image."""
    parts: list[ResponseInputContentParam] = [] if text is None else [{"type": "input_text", "text": text}]
    parts += [{"type": "input_image", "image_url": data_url(seed), "detail": "auto"} for seed in seeds]
    return [{"role": "user", "content": parts}]


E = TypeVar("E", bound=ResponseStreamEvent)


def last(events: list[ResponseStreamEvent], kind: type[E]) -> E:
    """The last event of class ``kind`` (each class is one ``type`` string): typed, unlike a dict."""
    return [event for event in events if isinstance(event, kind)][-1]


async def respond(
    session: ClientSession, body: dict[str, Any], path: str = "/v1/responses"
) -> tuple[int, Any]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


def collapsed(kinds: Sequence[str]) -> list[str]:
    """Event types with runs of deltas written once."""
    return [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]


@pytest.fixture
def greedy(tiny: Settings) -> Settings:
    return dataclasses.replace(tiny, num_beams=1, max_new_tokens=64)


# --- the SDK ------------------------------------------------------------------------------------


async def test_sdk_create_gets_the_caption(tiny: Settings) -> None:
    async with running_server(tiny) as url, ClientSession(url) as session:
        client = sdk(url)
        started = int(time.time())
        raw = await client.responses.with_raw_response.create(
            model="gpt-4.1-mini",
            input=said("What's in this image?", 1),
            instructions="You are a helpful assistant.",  # the system prompt: not read for the task
            metadata={"job": "42"},
        )
        reply = raw.parse()
        finished = int(time.time())
        await client.close()
        expected = await native_caption(session, 1, "<MORE_DETAILED_CAPTION>")  # the default task
    assert reply.output_text == expected and expected
    assert raw.headers["X-Model"] == "test:tiny" and raw.headers["X-Request-ID"]
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.status == "completed"
    assert reply.model == "test:tiny" and started <= reply.created_at <= finished
    assert reply.instructions == "You are a helpful assistant." and reply.metadata == {"job": "42"}
    store = reply.store  # type: ignore[attr-defined]  # the API sends store; openai's Response model lacks it
    assert store is False and reply.error is None and reply.incomplete_details is None
    [message] = reply.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert message.status == "completed"
    [part] = message.content
    assert part.type == "output_text" and part.text == expected and part.annotations == []
    usage = reply.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_sdk_stream_true_sends_openais_event_sequence(greedy: Settings) -> None:
    """Greedy decoding of one image: several deltas, as the tokens are generated."""
    async with running_server(greedy) as url, ClientSession(url) as session:
        client = sdk(url)
        stream = await client.responses.create(
            model="any", input=said("<MORE_DETAILED_CAPTION>", 2), stream=True, max_output_tokens=64
        )
        events = [event async for event in stream]
        await client.close()
        expected = await native_caption(session, 2, "<MORE_DETAILED_CAPTION>")  # greedy too
    kinds = [event.type for event in events]
    assert collapsed(kinds) == STREAM_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if isinstance(event, ResponseTextDeltaEvent)]
    assert len(deltas) > 1 and "".join(deltas) == expected
    assert last(events, ResponseTextDoneEvent).text == expected
    part = last(events, ResponseContentPartDoneEvent).part
    assert isinstance(part, ResponseOutputText) and part.text == expected
    final = last(events, ResponseCompletedEvent).response
    created = last(events, ResponseCreatedEvent).response
    assert final.output_text == expected and final.status == "completed" and final.usage is not None
    assert final.id == created.id and created.output == []
    item_id = last(events, ResponseOutputItemAddedEvent).item.id
    assert all(getattr(event, "item_id", item_id) == item_id for event in events)


async def test_sdk_stream_helper_gets_the_final_response(tiny: Settings) -> None:
    """``client.responses.stream`` checks the event order and builds the final response itself;
    beam search (the tiny default) streams the caption in one delta."""
    async with running_server(tiny) as url, ClientSession(url) as session:
        client = sdk(url)
        async with client.responses.stream(model="any", input=said("booru tags", 3)) as stream:
            texts = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        await client.close()
        expected = await native_caption(session, 3, "<GENERATE_TAGS>")
    assert texts == [expected] and final.output_text == expected and final.status == "completed"


async def test_sdk_raises_for_what_cannot_be_done(tmp_path: Path) -> None:
    async with running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url:
        client = sdk(url)
        with pytest.raises(openai.BadRequestError) as no_image:
            await client.responses.create(model="any", input="Describe the image.")
        with pytest.raises(openai.BadRequestError) as earlier:
            await client.responses.create(model="any", input=said("hi", 1), previous_response_id="resp_1")
        with pytest.raises(openai.NotFoundError) as stored:
            await client.responses.retrieve("resp_123")
        await client.close()
    assert no_image.value.param == "input" and "input_image" in no_image.value.message
    assert earlier.value.param == "previous_response_id" and earlier.value.code == "unsupported_value"
    assert "stores no responses" in stored.value.message


# --- raw requests -------------------------------------------------------------------------------


async def test_input_forms_and_both_prefixes(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        expected = await native_caption(session, 4, "<CAPTION>")
        image = {"type": "input_image", "image_url": data_url(4)}
        bodies: list[dict[str, Any]] = [
            {"model": "x", "input": said("short caption", 4)},
            # the text as a string message after the image: later user text counts
            {"input": [{"role": "user", "content": [image]}, {"role": "user", "content": "brief please"}]},
            # typed message items, a system message and an earlier turn that are not read
            {
                "input": [
                    {"type": "message", "role": "developer", "content": "Write booru tags."},
                    {"type": "message", "role": "user", "content": [image]},
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "x"}],
                    },
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "<CAPTION>"}],
                    },
                ],
                "store": True,  # accepted, and the reply says what happened: nothing was stored
                "tools": [],
                "tool_choice": "auto",
                "text": {"format": {"type": "text"}, "verbosity": "low"},
                "include": ["message.input_image.image_url"],
                "stream_options": None,
            },
        ]
        for path in ("/v1/responses", "/responses"):
            for body in bodies:
                status, reply = await respond(session, body, path)
                assert status == 200, reply
                assert reply["output"][0]["content"][0]["text"] == expected and reply["store"] is False


async def test_max_output_tokens_counts_caption_tokens_only(tiny: Settings) -> None:
    """1 is one caption token, not generate's one (which Florence-2 spends on its start token)."""
    async with client_for(tiny) as session:
        status, reply = await respond(
            session, {"input": said("<MORE_DETAILED_CAPTION>", 6), "max_output_tokens": 1}
        )
    assert status == 200 and reply["usage"]["output_tokens"] == 1, reply
    assert reply["output"][0]["content"][0]["text"].strip() and reply["status"] == "incomplete"


async def test_max_output_tokens_makes_an_incomplete_response(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        status, reply = await respond(
            session, {"input": said("<MORE_DETAILED_CAPTION>", 6), "max_output_tokens": 3}
        )
        async with session.post(
            "/v1/responses",
            json={"input": said("<MORE_DETAILED_CAPTION>", 6), "max_output_tokens": 3, "stream": True},
        ) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            text = await response.text()
    assert status == 200 and reply["status"] == "incomplete" and reply["max_output_tokens"] == 3
    assert (
        reply["incomplete_details"] == {"reason": "max_output_tokens"}
        and 0 < reply["usage"]["output_tokens"] <= 3
    )
    assert reply["output"][0]["status"] == "incomplete" and reply["completed_at"] is None
    names = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert [data["type"] for data in datas] == names and "[DONE]" not in text
    assert names[-1] == "response.incomplete" and datas[-1]["response"]["incomplete_details"]["reason"]


async def test_several_images_are_captioned_in_order(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        first = await native_caption(session, 7, "<CAPTION>")
        second = await native_caption(session, 8, "<CAPTION>")
        status, reply = await respond(session, {"input": said("<CAPTION>", 7, 8)})
    assert status == 200 and reply["output"][0]["content"][0]["text"] == f"{first}\n\n{second}"


@pytest.mark.parametrize(
    ("extra", "input_", "param", "code", "words"),
    [
        (
            {"previous_response_id": "resp_abc"},
            None,
            "previous_response_id",
            "unsupported_value",
            "stores no",
        ),
        (
            {"conversation": "conv_1"},
            None,
            "conversation",
            "unsupported_value",
            "whole conversation in input",
        ),
        ({"background": True}, None, "background", "unsupported_value", "Leave background out"),
        ({"prompt": {"id": "pmpt_1"}}, None, "prompt", "unsupported_value", "prompt templates"),
        ({"tools": [{"type": "web_search"}]}, None, "tools", "unsupported_value", "never calls tools"),
        ({"tool_choice": "required"}, None, "tool_choice", "unsupported_value", '"auto" or "none"'),
        (
            {"text": {"format": {"type": "json_object"}}},
            None,
            "text.format",
            "unsupported_value",
            "JSON output",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "c", "schema": {"type": "object"}}}},
            None,
            "text.format",
            "unsupported_value",
            '{"type": "text"}',
        ),
        ({"top_logprobs": 2}, None, "top_logprobs", "unsupported_value", "log probabilities"),
        (
            {"include": ["message.output_text.logprobs"]},
            None,
            "include",
            "unsupported_value",
            "log probabilities",
        ),
        (
            {"stream_options": {"include_obfuscation": False}},
            None,
            "stream_options",
            "invalid_request",
            "stream true",
        ),
        ({"max_output_tokens": "10"}, None, "max_output_tokens", "invalid_request", "not a string"),
        ({"instructions": ["x"]}, None, "instructions", "invalid_request", "must be a string"),
        (
            {},
            [
                {
                    "role": "user",
                    "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,AA=="}],
                }
            ],
            "input[0].content[0].type",
            "unsupported_value",
            "input_file parts cannot be read",
        ),
        (
            {},
            [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
            "input[0].content[0].file_id",
            "unsupported_value",
            "image_url: data:image/png;base64",
        ),
        (
            {},
            [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}],
                }
            ],
            "input[0].content[0].image_url",
            "invalid_request",
            "send the image inline",
        ),
        (
            {},
            [{"type": "function_call_output", "call_id": "c", "output": "{}"}],
            "input[0].type",
            "unsupported_value",
            "calls no tools",
        ),
        (
            {},
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            "input[0].content[0].type",
            "invalid_request",
            "input_image",
        ),
        ({}, [], "input", "invalid_request", "non-empty list"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    tmp_path: Path, extra: dict[str, Any], input_: Any, param: str, code: str, words: str
) -> None:
    body = {"model": "gpt-4.1", "input": said("caption", 1) if input_ is None else input_, **extra}
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        status, reply = await respond(session, body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert words in error["message"], error["message"]


async def test_stored_response_paths_say_nothing_is_stored(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        for method, path in (
            ("GET", "/v1/responses/resp_1"),
            ("DELETE", "/v1/responses/resp_1"),
            ("POST", "/v1/responses/resp_1/cancel"),
            ("GET", "/responses/resp_1/input_items"),
        ):
            async with session.request(method, path) as response:
                assert response.status == 404, path
                error = (await response.json())["error"]
                assert error["type"] == "not_found_error" and "stores no responses" in error["message"], path


def breaks_mid_stream() -> FakeCaptioner:
    """Streams "a dog on", then fails: a model failure after the stream began."""
    captioner = FakeCaptioner(text="a dog on")
    captioner.fail_caption = RuntimeError("the model broke")
    return captioner


async def test_a_failure_after_the_stream_began_ends_it_with_response_failed(tmp_path: Path) -> None:
    async with (
        running_server(Settings(cache_dir=tmp_path, num_beams=1), breaks_mid_stream()) as url,
        ClientSession(url) as session,
    ):
        async with session.post(
            "/v1/responses", json={"input": said("caption", 1), "stream": True}
        ) as response:
            text = await response.text()
        client = sdk(url)
        got: list[Any] = []
        async with client.responses.stream(model="any", input=said("caption", 2)) as stream:
            got = [event.type async for event in stream]
        await client.close()
    events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-2]["type"] == "response.output_text.delta" and events[-2]["delta"] == "a dog on"
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "caption_failed"  # the engine's own code
    assert "request id" in failed["response"]["error"]["message"]
    assert failed["response"]["output"][0]["content"][0]["text"] == "a dog on"
    assert got[-1] == "response.failed"
