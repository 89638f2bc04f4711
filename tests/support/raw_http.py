"""A stand-in server on a plain socket: each request is answered with the bytes a test gives.

aiohttp's web server only ever sends valid HTTP; what a broken proxy sends (a status line such
as ``HTTP/1.1 abc``, a header no parser takes) needs the bytes themselves. Every answer closes
its connection, so a client opens a new one for the next request, as after any broken answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

Reply = Callable[[str, bytes], Awaitable[bytes]]  # (path, body) -> the raw answer


def http_answer(status: int, body: bytes | str, content_type: str = "application/json") -> bytes:
    """A valid HTTP/1.1 answer that closes its connection."""
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + data


def caption_answer(text: str) -> bytes:
    return http_answer(200, json.dumps({"result": text}))


def image_name(body: bytes) -> str:
    """The image a ``/process_image`` request carries, where the test wrote a name as its bytes."""
    return base64.b64decode(json.loads(body)["image"]).decode()


@contextlib.asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[str]:
    """Serve on a free local port while inside; yields the base URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            writer.write(await reply(path, body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
