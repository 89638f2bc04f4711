"""The ``Server`` header: a plain ``vision-server``, never aiohttp's and Python's versions.

aiohttp answers ``Server: Python/3.x aiohttp/3.y`` unless a response names itself; a version
tells a scanner which published flaws to try, and nothing a client needs. The header is set as
each reply is prepared (:attr:`aiohttp.web.Application.on_response_prepare`), so every reply the
application gives carries it: captions, errors of every family, 404s, the page and gallery files.
A request aiohttp cannot even parse (a broken request line or header) is answered by aiohttp
itself before any application code runs; that 400 keeps aiohttp's default header.
"""

from __future__ import annotations

from aiohttp import hdrs, web

SERVER_NAME = "vision-server"


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Replace aiohttp's default (which is only filled in when the header is unset)."""
    response.headers[hdrs.SERVER] = SERVER_NAME
