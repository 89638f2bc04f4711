"""JSON output, forced tool calls, log probabilities and audio are refused with a 400 that says
so, as are stream_options without a stream; harmless forms pass.

A captioner only ever answers with caption text: a client that asked for JSON or forced a tool
call must learn that its request was not honoured instead of getting text it cannot parse, and
one that asked for logprobs or audio must not read their absence as an answer.
What SillyTavern, Open WebUI-style clients and the OpenAI SDK send by default keeps working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import ClientSession
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam
from openai.types.shared_params.response_format_json_schema import JSONSchema

from tests.support.images import data_url
from tests.support.serving import running_server
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
SCHEMA: JSONSchema = {
    "name": "caption",
    "schema": {"type": "object", "properties": {"text": {"type": "string"}}},
}


def messages(seed: int = 1) -> list[ChatCompletionMessageParam]:
    content: list[ChatCompletionContentPartParam] = [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image_url", "image_url": {"url": data_url(seed)}},
    ]
    return [{"role": "user", "content": content}]


async def post(session: ClientSession, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post("/v1/chat/completions", json=body) as response:
        if body.get("stream") and response.status == 200:
            return response.status, await response.text()
        return response.status, await response.json()


async def chat(tmp_path: Path, extra: dict[str, Any]) -> tuple[int, Any]:
    """A chat completion with ``extra`` fields, sent to a fresh server with a fake captioner."""
    body = {"model": "gpt-4-turbo", "messages": messages(), **extra}
    async with (
        running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url,
        ClientSession(url) as session,
    ):
        return await post(session, body)


@pytest.mark.parametrize(
    "extra",
    [
        {},  # the OpenAI SDK's defaults: it sends none of these fields
        {"response_format": None, "tools": None, "tool_choice": None},  # LiteLLM-style nulls
        {"response_format": {"type": "text"}},
        {"tools": []},
        {"tools": [], "tool_choice": "none"},
        {"tool_choice": "auto"},
        {"tools": [TOOL]},  # offered, not forced: a plain answer is what "auto" allows
        {"tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": True},
        {"tools": [TOOL], "tool_choice": "none"},
        {
            "tools": [TOOL],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        },
        {"functions": [TOOL["function"]], "function_call": "auto"},
        {"stream": True, "stream_options": {"include_usage": True}},  # Open WebUI-style
        {"logprobs": False, "top_logprobs": 0},
        {"logprobs": None, "top_logprobs": None, "modalities": None, "audio": None, "stream_options": None},
        {"modalities": ["text"]},
        {"stream": False},
    ],
)
async def test_harmless_forms_get_the_caption(tmp_path: Path, extra: dict[str, Any]) -> None:
    status, reply = await chat(tmp_path, extra)
    assert status == 200, reply
    if extra.get("stream"):
        assert '"content"' in reply and reply.rstrip().endswith("data: [DONE]")
    else:
        assert reply["choices"][0]["message"]["content"] and reply["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format", "'json_object' (JSON output)"),
        (
            {"response_format": {"type": "json_schema", "json_schema": SCHEMA}},
            "response_format",
            "'json_schema'",
        ),
        ({"response_format": {"type": "json_object"}, "stream": True}, "response_format", "plain text"),
        ({"response_format": {"type": "yaml"}}, "response_format", "'yaml' is not supported"),
        (
            {"tools": [TOOL], "tool_choice": "required"},
            "tool_choice",
            'tool_choice "required" cannot be honoured',
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "forces a tool",
        ),
        ({"tool_choice": "required"}, "tool_choice", "never calls tools"),
        (
            {"functions": [TOOL["function"]], "function_call": {"name": "get_weather"}},
            "function_call",
            "forces a function call",
        ),
        ({"logprobs": True}, "logprobs", "logprobs true cannot be honoured"),
        ({"logprobs": True, "top_logprobs": 5, "stream": True}, "logprobs", "log probabilities"),
        ({"top_logprobs": 3}, "top_logprobs", "top_logprobs 3 cannot be honoured"),
        ({"modalities": ["text", "audio"]}, "modalities", "['audio'] cannot be honoured"),
        (
            {"audio": {"voice": "alloy", "format": "wav"}},
            "audio",
            "An audio answer cannot be given",
        ),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    tmp_path: Path, extra: dict[str, Any], param: str, words: str
) -> None:
    status, reply = await chat(tmp_path, extra)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_value"
    assert error["param"] == param and words in error["message"]
    # The message says what to change, not only what is wrong.
    fix = {
        "response_format": '"text"',
        "logprobs": "Leave logprobs and top_logprobs out",
        "top_logprobs": "Leave logprobs and top_logprobs out",
        "modalities": 'modalities ["text"]',
        "audio": "Leave the audio object out",
    }.get(param, '"auto" or "none"')
    assert fix in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"kind": "text"}}, "response_format"),
        ({"tools": {"get_weather": {}}}, "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"function_call": 1}, "function_call"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"modalities": "text"}, "modalities"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # OpenAI's 400 too
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_malformed_fields_are_a_400_naming_them(
    tmp_path: Path, extra: dict[str, Any], param: str
) -> None:
    status, reply = await chat(tmp_path, extra)
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["code"] == "invalid_request"
    if param == "stream_options":
        assert "send stream true" in reply["error"]["message"]


async def test_the_sdk_raises_bad_request_for_json_mode(tmp_path: Path) -> None:
    async with running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-anything", max_retries=0)
        try:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="any",
                    messages=messages(),
                    response_format={"type": "json_schema", "json_schema": SCHEMA},
                )
            plain = await client.chat.completions.create(model="any", messages=messages())
        finally:
            await client.close()
    assert caught.value.code == "unsupported_value" and caught.value.param == "response_format"
    assert plain.choices[0].message.content
