"""Reading request bodies with clear errors, shared by every API family."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vision_server.api.deadlines import deadline
from vision_server.api.encodings import body_bytes
from vision_server.api.errors import MissingField
from vision_server.api.state import SETTINGS, UPLOADS
from vision_server.errors import BadRequest, BodyTimeout, Draining

# Bodies at least this big are parsed on a worker thread, with their long strings (the base64
# images) cut out first: json.loads then holds the GIL for microseconds instead of ~20 ms per
# 12 MB, so other requests (probes, /prompts) are not kept waiting.
T = TypeVar("T")
LIFT_MIN = 64 * 1024
MAX_LIFT_QUOTES = 4096  # more strings than this: plain json.loads (no Python loop over them)
# json.loads holds the GIL for the whole parse, and builds a Python object per value: 18 MB of
# ``[[],[],...]`` took 7 s (the event loop, /health included, stalled all along) and ``{}``s
# half a GB. No request needs more than a few thousand values (the images are strings), so a
# body with more than this many commas and opening brackets outside its strings is refused
# before it is parsed (:func:`value_count`).
MAX_JSON_VALUES = 100_000


async def read_body(request: web.Request) -> bytes:
    """The whole body, decoded from its ``Content-Encoding`` (:mod:`.encodings`), within
    ``--body-timeout`` (408 after it): a client that sends a byte now and then cannot hold a
    connection and its buffer forever."""
    limit = request.app[SETTINGS].max_request_bytes
    return await within_body_timeout(request, body_bytes(request, limit))


async def within_body_timeout(request: web.Request, reading: Awaitable[T]) -> T:
    """``reading`` (of the body), or :class:`BodyTimeout` when it outlasts ``--body-timeout``.

    A body still arriving when the server starts to drain is cut short with a 503: its job would
    be refused anyway, and a slow upload must not hold the exit past the drain.
    """
    seconds = request.app[SETTINGS].body_timeout
    uploads = request.app[UPLOADS]
    if uploads.cut:
        close_unread(reading)
        raise draining()
    try:
        async with deadline(seconds) as moving:  # in this task: no second task holding the body's frames
            with uploads.open(moving):
                return await reading
    except web.RequestPayloadError as exc:
        raise unreadable_body(request, exc) from None
    except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11 on
        if uploads.cut:
            raise draining() from None
        raise BodyTimeout(
            f"The request body did not arrive within {seconds:g} s (--body-timeout): "
            "the upload stalled or was too slow."
        ) from None


def unreadable_body(request: web.Request, exc: web.RequestPayloadError) -> BadRequest:
    """The 400 for a body aiohttp's parser gave up on (a broken chunked encoding).

    aiohttp reads what is left of a body after the reply, to keep the connection; a body its
    parser refused would fail there again, logged as an unhandled exception with a traceback.
    So the body is marked ended and the connection closed after the reply instead."""
    close_after_reply(request)
    cause = exc.__cause__
    said = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    reason = " ".join(str(said).split()) or type(exc).__name__
    return BadRequest(f"The request body cannot be read ({reason[:200]}).")


def close_after_reply(request: web.Request) -> None:
    """Mark the body ended and close the connection once the reply is sent: aiohttp would read
    the rest of a body its parser gave up on to keep the connection, and fail there again."""
    request.content.feed_eof()
    request.protocol.close()


def draining() -> Draining:
    return Draining("The server is shutting down; retry on another instance.", retry_after=5)


def close_unread(reading: Awaitable[object]) -> None:
    """Close a body read that will not be awaited (no 'never awaited' warning)."""
    close = getattr(reading, "close", None)
    if callable(close):
        close()


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 with the reason when it is not one (413 when too big)."""
    raw = await read_body(request)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    body = await asyncio.to_thread(parse_json, raw) if len(raw) >= LIFT_MIN else parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


class NotAJsonNumber(Exception):
    """``NaN``, ``Infinity`` or a number past a double's range (``1e400``): Python's json reads
    them, but JSON has no such numbers, and echoed back (the Responses API echoes ``metadata``)
    they made replies that JSON parsers refuse."""


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotAJsonNumber(f"{text[:40]} is past the range of a JSON number")
    return number


def _no_constant(name: str) -> Any:
    raise NotAJsonNumber(f"{name} is not a JSON number")


def _strict_loads(text: bytes) -> Any:
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)


def parse_json(raw: bytes) -> Any:
    """``json.loads`` with the errors a client can cause turned into 400s."""
    try:
        return _loads(raw)
    except NotAJsonNumber as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc}; send a finite number or null."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("The request body nests JSON arrays or objects too deeply.") from None
    except ValueError:  # what is left is Python's guard against quadratic int parsing
        digits = sys.get_int_max_str_digits()
        raise BadRequest(f"The request body has a number with more than {digits} digits.") from None


def value_count(text: bytes) -> int:
    """The commas and opening brackets of ``text`` outside its strings: about its JSON values.

    Counting every one is an upper bound at C speed, and enough for almost every body. Past the
    limit, the ones inside strings (a system message full of commas and line breaks) are left
    out, still at C speed: escapes (``\\\\``, then ``\\"``) are blanked, so every quote left
    opens or closes a string, and the pieces between them alternate. A body with more such
    quotes than four times the limit (surely: more quotes than backslashes by that much) has
    more strings than twice the limit, and so (two strings per object member at most) more
    values than the limit: its bound stands, and it is never split into millions of pieces.
    """
    upper = text.count(b",") + text.count(b"[") + text.count(b"{")
    if upper <= MAX_JSON_VALUES:
        return upper
    most_quotes = 4 * (MAX_JSON_VALUES + 1)
    quotes = text.count(b'"')
    if not quotes or quotes - text.count(b"\\") > most_quotes:  # no strings; surely too many
        return upper
    plain = text.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    if plain.count(b'"') > most_quotes:
        return upper
    outside = b"".join(plain.split(b'"')[::2])
    return outside.count(b",") + outside.count(b"[") + outside.count(b"{")


def _check_value_count(text: bytes) -> None:
    """400 for a body of more than :data:`MAX_JSON_VALUES` values (:func:`value_count`)."""
    values = value_count(text)
    if values > MAX_JSON_VALUES:
        raise BadRequest(
            f"The request body holds about {values} JSON values (counting its commas and "
            f"brackets outside strings); the limit is {MAX_JSON_VALUES}. Send each image as one "
            "base64 string and only the fields the API reads."
        )


def _counted_loads(text: bytes) -> Any:
    _check_value_count(text)
    return _strict_loads(text)


def _loads(raw: bytes) -> Any:
    """Parse with every long escape-free string lifted out and put back afterwards; a big body's
    values are counted first (:func:`_check_value_count`)."""
    if len(raw) < LIFT_MIN:
        return _strict_loads(raw)
    if raw[:1] not in (b"{", b"["):
        return _counted_loads(raw)
    pieces: list[bytes] = []
    lifted: dict[str, tuple[int, int]] = {}
    position, quote = 0, raw.find(b'"')
    for _ in range(MAX_LIFT_QUOTES):
        if quote == -1:
            break
        end = _closing_quote(raw, quote)
        if end == -1:
            return _counted_loads(raw)  # unterminated: let json say where
        if end - quote > LIFT_MIN and raw.find(b"\\", quote, end) == -1:
            token = f"\x00lifted-{len(lifted)}"
            pieces += [raw[position:quote], json.dumps(token).encode()]
            lifted[token] = (quote + 1, end)
            position = end + 1
        quote = raw.find(b'"', end + 1)
    else:
        return _counted_loads(raw)  # a body of many strings: no Python loop over all of them
    if not lifted:
        return _counted_loads(raw)
    rest = b"".join([*pieces, raw[position:]])
    _check_value_count(rest)
    try:
        value = _strict_loads(rest)
    except ValueError:
        return _strict_loads(raw)  # report the error at its real position
    return _put_back(value, {token: raw[start:end].decode("utf-8") for token, (start, end) in lifted.items()})


def _closing_quote(raw: bytes, opening: int) -> int:
    end = raw.find(b'"', opening + 1)
    while end != -1:
        backslashes = 0
        while raw[end - 1 - backslashes] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return end
        end = raw.find(b'"', end + 1)
    return -1


def _put_back(value: Any, lifted: dict[str, str]) -> Any:
    """Replace the placeholder strings in ``value`` (iteratively: it may nest deeply)."""
    if isinstance(value, str):
        return lifted.get(value, value)
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in list(items):
            if isinstance(child, str) and child in lifted:
                node[key] = lifted[child]
            elif isinstance(child, (dict, list)):
                stack.append(child)
    return value


def require_str(body: dict[str, Any], name: str) -> str:
    if name not in body or body[name] is None:
        raise MissingField(name)
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"Field {name!r} must be a string, not {type(value).__name__}.")
    return value
