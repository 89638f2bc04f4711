"""Seeing a compressed body that has all arrived but will never end.

aiohttp refuses deflate that ends early when its message completes, by raising out of its
parser instead of into the body: the body never ends, and its reader waited for
``--body-timeout`` (120 s by default) to be told that the upload "stalled or was too slow".
(The same body in one packet with its headers never reaches a handler: aiohttp answers it with
a plain-text 400 of its own.) So while a compressed body of known length is read, a watcher
looks every :data:`POLL` seconds: all its bytes in, no end, and nothing more decompressed since
the last look means the parser has given up, and the read is cut short at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import StreamReader, hdrs, web

from vision_server.api.deadlines import Deadline

POLL = 0.25  # seconds between looks; a body that decompresses at all moves on within one


def content_encoding(request: web.Request) -> str:
    """The body's ``Content-Encoding`` as sent (stripped; empty when there is none)."""
    return request.headers.get(hdrs.CONTENT_ENCODING, "").strip()


class Inflation:
    """Whether the watcher ended a read because its body can never end."""

    def __init__(self) -> None:
        self.stuck = False


@contextlib.contextmanager
def watched(request: web.Request, moving: Deadline, inflation: Inflation) -> Iterator[None]:
    """Watch the body of ``request`` while the block reads it; on a body that cannot end, move
    ``moving`` (the read's deadline) to now and set ``inflation.stuck``. Only a compressed body
    of known length is watched: only then is "all of it has arrived" known."""
    length = request.content_length
    compressed = content_encoding(request)
    # total_raw_bytes (the bytes received before decompression) is no documented attribute of
    # aiohttp's reader: an aiohttp without it reads unwatched, as before, up to --body-timeout.
    if not compressed or not length or not hasattr(request.content, "total_raw_bytes"):
        yield
        return
    watcher = asyncio.ensure_future(_watch(request.content, length, moving, inflation))
    try:
        yield
    finally:
        watcher.cancel()


async def _watch(content: StreamReader, length: int, moving: Deadline, inflation: Inflation) -> None:
    seen = -1  # bytes decompressed at the last look that found all the body in and no end
    while not content.is_eof():
        await asyncio.sleep(POLL)
        if content.total_raw_bytes < length or content.is_eof():
            seen = -1
            continue
        if content.total_bytes == seen:
            inflation.stuck = True
            if not moving.expired():
                moving.reschedule(asyncio.get_running_loop().time())
            return
        seen = content.total_bytes
