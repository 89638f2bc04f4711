"""What a chat completion may ask for that a captioner cannot give: JSON output, tool calls,
log probabilities, audio.

A captioner answers with caption text, nothing else. A client that asks for JSON
(``response_format`` ``json_object`` or ``json_schema``) or forces a tool call (``tool_choice``
``"required"`` or a named tool, or the legacy ``function_call`` with a name) would get text it
cannot parse and no way to tell; a client that asks for token log probabilities (``logprobs``
true, ``top_logprobs``) or an audio answer (``modalities`` with ``"audio"``, an ``audio``
object) would read a missing field as "none". So those requests are a 400 in OpenAI's error
shape, naming the field and saying what to send instead (code ``unsupported_value``, as OpenAI
answers a value a model cannot take). ``stream_options`` without ``stream: true`` is a 400 too,
as OpenAI answers it: the options would silently do nothing.

Forms that ask for nothing a captioner lacks pass: ``response_format`` absent, null or
``{"type": "text"}``; ``tools`` (and ``functions``) absent, null or empty; and tools offered
with ``tool_choice`` absent, ``"auto"`` or ``"none"``, since under "auto" a plain answer is
what the model may always give, and under "none" the only one. ``logprobs`` false or absent,
``top_logprobs`` 0 or absent and ``modalities`` ``["text"]`` pass as well.
"""

from __future__ import annotations

from typing import Any

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import json_bool, json_int, shown

TEXT_ONLY = (
    'this server answers with the caption as plain text. Leave response_format out or send {"type": "text"}.'
)
NO_TOOLS = "this server captions images and never calls tools."
FIX_TOOL_CHOICE = 'Send tool_choice "auto" or "none", or leave tools and tool_choice out.'


class UnsupportedValue(InvalidParameter):
    """A field whose value asks for something this server cannot do (OpenAI's own code for it)."""

    code = "unsupported_value"


NO_LOGPROBS = (
    "this server does not report token log probabilities (its captioners do not expose them). "
    "Leave logprobs and top_logprobs out."
)
TEXT_MODALITY = 'this server answers with text only. Send modalities ["text"] or leave it out.'


def check_supported(body: dict[str, Any]) -> None:
    """400 for a request whose answer would have to be JSON, a tool call, log probabilities or
    audio, or whose ``stream_options`` would be ignored."""
    check_response_format(body.get("response_format"))
    check_tools("tools", body.get("tools"))
    check_tools("functions", body.get("functions"))
    check_tool_choice(body.get("tool_choice"))
    check_function_call(body.get("function_call"))
    check_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    check_modalities(body.get("modalities"), body.get("audio"))
    check_stream_options(body.get("stream_options"), body.get("stream"))


def check_response_format(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidParameter(
            "response_format",
            f'response_format must be an object such as {{"type": "text"}}, not {shown(value)}.',
        )
    kind = value["type"]
    if kind == "text":
        return
    if kind in ("json_object", "json_schema"):
        raise UnsupportedValue(
            "response_format",
            f"response_format {kind!r} (JSON output) cannot be honoured: {TEXT_ONLY}",
        )
    raise UnsupportedValue(
        "response_format", f"response_format type {shown(kind)} is not supported: {TEXT_ONLY}"
    )


def check_tools(param: str, value: object) -> None:
    """Tools on offer are fine (a caption is an answer that calls none); they must be a list."""
    if value is not None and not isinstance(value, list):
        raise InvalidParameter(param, f"{param} must be a list of tool definitions, not {shown(value)}.")


def check_tool_choice(value: object) -> None:
    if value is None or value in ("auto", "none"):
        return
    if value == "required":
        raise UnsupportedValue(
            "tool_choice", f'tool_choice "required" cannot be honoured: {NO_TOOLS} {FIX_TOOL_CHOICE}'
        )
    if isinstance(value, dict):
        allowed = value.get("allowed_tools")
        mode = allowed.get("mode") if isinstance(allowed, dict) else None
        if value.get("type") == "allowed_tools" and mode == "auto":
            return  # a subset of the tools, any of them or none: a plain answer is allowed
        raise UnsupportedValue(
            "tool_choice",
            f"tool_choice {shown(value)} forces a tool call, which cannot be honoured: {NO_TOOLS} "
            f"{FIX_TOOL_CHOICE}",
        )
    raise InvalidParameter(
        "tool_choice", f'tool_choice must be "none", "auto", "required" or an object, not {shown(value)}.'
    )


def check_function_call(value: object) -> None:
    """The legacy ``function_call`` (before ``tool_choice``): "none", "auto" or a forced name."""
    if value is None or value in ("auto", "none"):
        return
    if isinstance(value, dict):
        raise UnsupportedValue(
            "function_call",
            f"function_call {shown(value)} forces a function call, which cannot be honoured: {NO_TOOLS} "
            'Send function_call "auto" or "none", or leave it out.',
        )
    raise InvalidParameter(
        "function_call", f'function_call must be "none", "auto" or an object, not {shown(value)}.'
    )


def check_logprobs(logprobs: object, top_logprobs: object) -> None:
    """``logprobs`` true or ``top_logprobs`` above 0 ask for numbers this server has not got."""
    if json_bool("logprobs", logprobs):
        raise UnsupportedValue("logprobs", f"logprobs true cannot be honoured: {NO_LOGPROBS}")
    if json_int("top_logprobs", top_logprobs, low=0, high=20):
        raise UnsupportedValue(
            "top_logprobs", f"top_logprobs {top_logprobs} cannot be honoured: {NO_LOGPROBS}"
        )


def check_modalities(modalities: object, audio: object) -> None:
    """Text is the one output modality; ``audio`` (its voice and format) asks for speech."""
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(kind, str) for kind in modalities):
            raise InvalidParameter(
                "modalities", f'modalities must be a list such as ["text"], not {shown(modalities)}.'
            )
        other = [kind for kind in modalities if kind != "text"]
        if other:
            raise UnsupportedValue(
                "modalities", f"modalities {shown(other)} cannot be honoured: {TEXT_MODALITY}"
            )
    if audio is not None:
        raise UnsupportedValue(
            "audio", f"An audio answer cannot be given: {TEXT_MODALITY} Leave the audio object out."
        )


def check_stream_options(options: object, stream: object) -> None:
    """``stream_options`` only mean something for a stream; OpenAI refuses them otherwise. An
    empty object asks for nothing and passes; a value of the wrong type is a 400 about the type."""
    if not isinstance(options, dict) or not options:
        return  # null, {}, or the wrong type (which the parser names)
    json_bool("stream_options.include_usage", options.get("include_usage"))
    if not json_bool("stream", stream):
        raise InvalidParameter(
            "stream_options",
            "stream_options only apply to a streamed answer: send stream true with them, or leave "
            "stream_options out.",
        )
