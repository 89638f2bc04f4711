"""What a Responses API request may ask for that this server cannot give.

The Responses API is built around state kept at OpenAI (stored responses, conversations,
background runs, prompt templates) and tools run by the model. This server keeps nothing and
calls nothing: it captions the images of the request and answers in the same HTTP exchange.
A request that relies on any of that is a 400 in OpenAI's error shape, naming the field and
saying what to send instead (code ``unsupported_value``, as in
:mod:`vision_server.api.openai_unsupported`), rather than a caption that silently ignores it:

- ``previous_response_id``, ``conversation``: no response is stored to continue from;
- ``prompt`` (a stored prompt template), ``background: true``;
- ``tools`` (non-empty) and a ``tool_choice`` other than ``"auto"``/``"none"``;
- ``text.format`` other than ``{"type": "text"}`` (JSON output);
- ``top_logprobs`` above 0 and ``include`` with ``message.output_text.logprobs``.

``store`` is accepted (OpenAI's default is true, so SDK code written for OpenAI may send it)
and never honoured: every reply says ``"store": false``, which is what happened.
"""

from __future__ import annotations

from typing import Any

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import json_bool, shown
from vision_server.api.openai_unsupported import (
    NO_TOOLS,
    UnsupportedValue,
    check_logprobs,
    check_stream_options,
)

STATELESS = "this server stores no responses or conversations; send the whole conversation in input."
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def check_responses_supported(body: dict[str, Any]) -> None:
    """400 for a request that needs stored state, tools, JSON output or log probabilities."""
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise UnsupportedValue(field, f"{field} cannot be honoured: {STATELESS}")
    if body.get("prompt") is not None:
        raise UnsupportedValue(
            "prompt", "Stored prompt templates are not available here; send the prompt's text in input."
        )
    if json_bool("background", body.get("background")):
        raise UnsupportedValue(
            "background",
            "background true cannot be honoured: this server answers within the request and keeps "
            "nothing to poll. Leave background out (stream true sends the caption as it is generated).",
        )
    json_bool("store", body.get("store"))  # accepted either way; replies say "store": false
    check_tools(body.get("tools"), body.get("tool_choice"))
    check_text_format(body.get("text"))
    check_logprobs(None, body.get("top_logprobs"))
    check_include(body.get("include"))
    check_stream_options(body.get("stream_options"), body.get("stream"))


def check_tools(tools: object, choice: object) -> None:
    if tools is not None and not isinstance(tools, list):
        raise InvalidParameter("tools", f"tools must be a list of tool definitions, not {shown(tools)}.")
    if tools:
        raise UnsupportedValue("tools", f"tools cannot be offered: {NO_TOOLS} Leave tools out.")
    if choice is not None and choice not in ("auto", "none"):
        raise UnsupportedValue(
            "tool_choice",
            f"tool_choice {shown(choice)} cannot be honoured: {NO_TOOLS} "
            'Send "auto" or "none", or leave it out.',
        )


def check_text_format(text: object) -> None:
    """``text`` may set ``verbosity`` (ignored) and a ``format``, which must be plain text."""
    if text is None:
        return
    if not isinstance(text, dict):
        raise InvalidParameter(
            "text", f'text must be an object such as {{"format": {{"type": "text"}}}}, not {shown(text)}.'
        )
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidParameter(
            "text.format", f'text.format must be an object such as {{"type": "text"}}, not {shown(fmt)}.'
        )
    kind = fmt["type"]
    if kind != "text":
        what = f"{kind!r} (JSON output)" if kind in ("json_object", "json_schema") else f"type {shown(kind)}"
        raise UnsupportedValue(
            "text.format",
            f"text.format {what} cannot be honoured: this server answers with the caption as plain "
            'text. Leave text.format out or send {"type": "text"}.',
        )


def check_include(include: object) -> None:
    """Each ``include`` value asks for extra output; there is none here to add. Only the log
    probabilities one would be misread (as "none were reported"), so only it is refused."""
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise InvalidParameter("include", f"include must be a list of strings, not {shown(include)}.")
    if LOGPROBS_INCLUDE in include:
        raise UnsupportedValue(
            "include",
            f"include {LOGPROBS_INCLUDE!r} cannot be honoured: this server does not report token "
            "log probabilities. Leave it out of include.",
        )
