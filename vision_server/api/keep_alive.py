"""A request's ``keep_alive``, with Ollama's meaning: how long the model stays loaded after it.

Seconds as a number (``300``, ``"300"``) or a duration string (``"10m"``, ``"1h30m"``,
``"90s"``, ``"-1m"``). ``0`` unloads once this request's batch is done and nothing else waits;
a negative value keeps the model loaded until another request sets a keep-alive. The engine
grants at most ``--max-keep-alive`` and says what it granted in the ``X-Keep-Alive`` header.
"""

from __future__ import annotations

import math
import re

from aiohttp import web

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.engine.scheduler import Engine

KEEP_ALIVE_HEADER = "X-Keep-Alive"
GRANTED = web.RequestKey("keep_alive_granted", float)
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"([+-])?((?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+)")
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
# A duration is read in the event loop, about 0.1 s a megabyte: an 8 MB "1h1h1h..." stalled every
# request for 4 s. Real ones are a few characters.
MAX_KEEP_ALIVE_CHARS = 64


def keep_alive_hint(cap: float) -> str:
    """The forms a ``keep_alive`` may take, as a 400 shows them: only values this server
    accepts, so "keep loaded" (``-1``) only when there is no cap (``cap`` < 0), which refuses it."""
    if cap < 0:
        return "seconds (300), or a duration such as '10m', '1h30m' or '-1' (keep loaded)"
    return (
        "seconds (300), or a duration such as '10m' or '1h30m' (this server keeps the model "
        f"loaded at most {cap:g} s after a request: --max-keep-alive)"
    )


def parse_keep_alive(value: object, *, cap: float) -> float | None:
    """Seconds from a number or a duration string; None when absent; 400 for anything else,
    whose message shows the forms that work under the server's keep-alive ``cap``."""
    if value is None or value == "":
        return None
    hint = keep_alive_hint(cap)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidParameter("keep_alive", f"'keep_alive' must be {hint}, not {type(value).__name__}.")
    if isinstance(value, str) and len(value) > MAX_KEEP_ALIVE_CHARS:
        raise InvalidParameter(
            "keep_alive",
            f"'keep_alive' must be {hint}, not a string of {len(value)} characters "
            f"(the limit is {MAX_KEEP_ALIVE_CHARS}).",
        )
    seconds = _seconds(value.strip()) if isinstance(value, str) else _number(value)
    if seconds is None or not math.isfinite(seconds):
        raise InvalidParameter("keep_alive", f"'keep_alive' must be {hint}, not {shown(value)}.")
    return seconds


def _number(value: int | float) -> float:
    """A JSON number as seconds; an integer too big for a float (``9`` x 400) is infinite, refused
    like ``1e999`` rather than an OverflowError (a 500)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _seconds(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    total = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(match.group(2)))
    return -total if match.group(1) == "-" else total


def keep_alive_for(request: web.Request, engine: Engine, value: object) -> float | None:
    """The keep-alive granted for ``value`` (None when the request asks for none), remembered
    on the request for the ``X-Keep-Alive`` header."""
    asked = parse_keep_alive(value, cap=engine.keep_alive_cap)
    if asked is None:
        return None
    granted = engine.grant_keep_alive(asked)
    request[GRANTED] = granted
    return granted


async def add_keep_alive_header(request: web.Request, response: web.StreamResponse) -> None:
    """Tell the client what it was granted (also on streamed replies, which are prepared early)."""
    granted = request.get(GRANTED)
    if granted is not None:
        response.headers[KEEP_ALIVE_HEADER] = f"{granted:g}"
