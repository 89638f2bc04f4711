"""Request bodies sent under ``Content-Encoding``: the server decodes gzip and deflate itself.

aiohttp's own decoding (off: ``auto_decompress=False`` in :func:`vision_server.app.create_app`)
answered a ``br`` or ``zstd`` body (no decoder installed) and deflate cut short in the packet of
its headers with a plain-text 400 of its own, before any handler, middleware, access line or
metric saw the request; it passed on gzip that ends early, or lacks only its checksum, as if
whole; and deflate cut short after its headers left the handler waiting for ``--body-timeout``.
Decoding the whole body here, strictly, makes each of those a reply in the route's own shape:
a coding it does not decode is a 415 naming the ones it does, and a body that is not complete
gzip or deflate (cut anywhere, checksum wrong, bytes after its end) a 400 that says so.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from aiohttp import StreamReader, hdrs, web

from vision_server.errors import BadRequest, PayloadTooLarge, VisionServerError

DECODED = ("gzip", "deflate")
ALIASES = {"x-gzip": "gzip"}  # the old name, which RFC 9110 asks servers to read as gzip
THREAD_MIN = 64 * 1024  # bodies at least this big are decoded on a worker thread (zlib drops the GIL)
# Concatenated gzip members are one valid body (``cat a.gz b.gz``); past this many, a body of
# thousands of empty members only costs time, and no client sends one.
MAX_MEMBERS = 64
GZIP_MAGIC = b"\x1f\x8b"


class UnsupportedEncoding(VisionServerError):
    """A ``Content-Encoding`` the server does not decode (RFC 9110: 415, with the codings it
    does in ``Accept-Encoding``)."""

    status = 415
    code = "unsupported_encoding"
    reply_headers: ClassVar[Mapping[str, str]] = MappingProxyType({hdrs.ACCEPT_ENCODING: ", ".join(DECODED)})


def content_encoding(request: web.Request) -> str:
    """The body's ``Content-Encoding`` as sent (stripped; empty when there is none)."""
    return request.headers.get(hdrs.CONTENT_ENCODING, "").strip()


def coding_of(request: web.Request) -> str | None:
    """The coding to decode the body from (``gzip`` or ``deflate``); None for a body sent as it
    is. 415 for any other, and for a body coded twice over."""
    header = content_encoding(request)
    codings = [ALIASES.get(c, c) for c in (part.strip().lower() for part in header.split(","))]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if not codings:
        return None
    if len(codings) > 1:
        raise UnsupportedEncoding(
            f"Content-Encoding {header[:60]} applies more than one coding; send the body "
            "compressed once with gzip or deflate, or uncompressed without the header."
        )
    if codings[0] not in DECODED:
        raise UnsupportedEncoding(
            f"Content-Encoding {codings[0][:40]} is not supported; send the body compressed with "
            "gzip or deflate, or uncompressed without the header."
        )
    return codings[0]


async def body_bytes(request: web.Request, limit: int) -> bytes:
    """The whole body, decoded from its ``Content-Encoding``: at most ``limit`` bytes (413 past
    it, so a small body that inflates to gigabytes is refused as it grows)."""
    coding = coding_of(request)  # before reading: an unknown coding is refused unread
    raw = await request.read()
    if coding is None or not raw:
        return raw
    if len(raw) < THREAD_MIN:
        return decode(raw, coding, limit, content_encoding(request))
    return await asyncio.to_thread(decode, raw, coding, limit, content_encoding(request))


async def decoded_stream(request: web.Request, limit: int) -> StreamReader:
    """The body as a stream to read from: the request's own, or, for a compressed body, one
    over its decoded bytes (read whole first, within ``limit``)."""
    if coding_of(request) is None:
        return request.content
    data = await body_bytes(request, limit)
    # all of it fed at once, under the stream's high-water mark: it never pauses the connection
    stream = StreamReader(request.protocol, limit=len(data) + 1, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    return stream


def decode(raw: bytes, coding: str, limit: int, header: str) -> bytes:
    """``raw`` decoded from ``coding``, strictly: the stream must end (with gzip's checksum and
    size right), and nothing but further gzip members may follow it."""
    out = bytearray()
    data = raw
    for _ in range(MAX_MEMBERS):
        inflater = zlib.decompressobj(_window_bits(coding, data))
        try:
            out += inflater.decompress(data, limit + 1 - len(out))  # never 0: that means "no limit"
        except zlib.error as exc:
            raise not_that_coding(coding, header, str(exc)) from None
        if len(out) > limit:
            raise PayloadTooLarge(
                f"Request body too large: it decompresses to more than the limit of {limit} bytes "
                "(--max-request-bytes). Send a smaller image."
            )
        if not inflater.eof:
            raise ends_early(coding, header)
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if coding != "gzip" or not data.startswith(GZIP_MAGIC):
            raise not_that_coding(coding, header, f"{len(data)} bytes follow the end of its {coding} data")
    raise BadRequest(
        f"The request body holds more than {MAX_MEMBERS} gzip members one after another (the "
        "header says Content-Encoding: gzip); compress the body as one."
    )


def _window_bits(coding: str, data: bytes) -> int:
    """zlib's mode: gzip; deflate in its zlib wrapper as HTTP defines it, or raw deflate (which
    many clients send instead, and aiohttp read too) when the first two bytes are no zlib header."""
    if coding == "gzip":
        return 16 + zlib.MAX_WBITS
    wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    return zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS


def not_that_coding(coding: str, header: str, reason: str) -> BadRequest:
    return BadRequest(
        f"The request body cannot be read (it is not valid {coding}: {reason[:200]}). The header "
        f"says Content-Encoding: {header[:40]}; send the body compressed that way, or "
        "uncompressed without the header."
    )


def ends_early(coding: str, header: str) -> BadRequest:
    """The 400 for a body that stops before its compressed data ends (cut in transit, or a
    client that sent a partial buffer), wherever it was cut."""
    return BadRequest(
        f"The request body ends before its {coding} data does: the header says Content-Encoding: "
        f"{header[:40]}, and the body is most likely not complete {coding} (cut short in transit, "
        "or only part of a buffer sent). Send the body compressed whole, or uncompressed without "
        "the header."
    )
