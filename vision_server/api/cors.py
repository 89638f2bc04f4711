"""Cross-origin access for browser clients, off unless ``--cors-origin`` names some origins.

SillyTavern's Extras mode calls ``/api/caption`` from the browser page itself, so the browser
first sends a preflight ``OPTIONS`` and then only shows the reply to the page when it carries
``Access-Control-Allow-Origin``. Preflights are answered before any other middleware (they
carry no API key, by design), allowing ``Content-Type``, ``Authorization``, SillyTavern's
``Bypass-Tunnel-Reminder`` and our ``X-Request-ID``, ``X-Priority`` and ``X-Client-Id``, plus
whatever other headers the preflight asks for, and exposing the reply headers a page may read
(``EXPOSE_HEADERS``). The OpenAI JavaScript SDK (and every other Stainless-made SDK) sends its
own ``X-Stainless-*`` headers, more with each release; a fixed list refuses them and the browser
never sends the request. The origin is what the operator vouched for, so its headers pass. A
preflight from an origin not configured gets 403 and no allow headers, also with CORS off (not
the router's 405), and the first refusal of each origin is logged with the flag that would
allow it: a refused preflight never reaches the access log, and the browser shows the page's
author only a generic CORS failure. ``*`` allows every origin: fine with an API key (a page
cannot send it unless its user typed it in), but without one every page the browser opens may
call the server and read the answers, loopback or not (the server warns at start).
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from vision_server.api.errors import Handler
from vision_server.api.state import SETTINGS

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Authorization, Bypass-Tunnel-Reminder, X-Request-ID, X-Priority, X-Client-Id"
EXPOSE_HEADERS = "X-Request-ID, Retry-After, X-Keep-Alive, X-Model"  # X-Model: who captioned
MAX_AGE = "600"
REFUSED_ORIGINS = web.AppKey("cors_refused_origins", set[str])  # refusals already logged
MAX_LOGGED_REFUSALS = 100  # a page cannot fill the log by inventing origins

log = logging.getLogger("vision_server")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 token)


def allow_headers(requested: str | None) -> str:
    """Our own list, then every other well-formed header name the preflight asked for."""
    names = [name.strip() for name in ALLOW_HEADERS.split(",")]
    known = {name.lower() for name in names}
    for name in (requested or "").split(","):
        name = name.strip()
        if _TOKEN.fullmatch(name) and name.lower() not in known:
            names.append(name)
            known.add(name.lower())
    return ", ".join(names)


def allowed_origin(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin``, or None when it is not allowed."""
    if not origin:
        return None
    if "*" in allowed:
        return "*"
    wanted = {entry.strip().rstrip("/").lower() for entry in allowed}
    return origin if origin.rstrip("/").lower() in wanted else None


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def preflight_response(request: web.Request, allowed: tuple[str, ...]) -> web.Response:
    origin = allowed_origin(request.headers.get("Origin"), allowed)
    if origin is None:
        sent = request.headers.get("Origin")
        if allowed:
            message = f"Origin {sent!r} is not allowed; add it with --cors-origin."
        else:
            message = (
                f"Cross-origin requests are off; start the server with --cors-origin {sent or 'ORIGIN'} "
                "to let pages from that origin call it."
            )
        _log_first_refusal(request, sent or "(none)", message)
        return web.json_response({"error": message}, status=403)
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": allow_headers(request.headers.get("Access-Control-Request-Headers")),
        "Access-Control-Max-Age": MAX_AGE,
        # the answer depends on the headers asked for, so a cache must not reuse it for others
        "Vary": "Origin, Access-Control-Request-Headers",
    }
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"  # Chrome: public page → LAN server
    return web.Response(status=204, headers=headers)


def _log_first_refusal(request: web.Request, origin: str, message: str) -> None:
    seen = request.app.get(REFUSED_ORIGINS)
    if seen is None or origin in seen or len(seen) >= MAX_LOGGED_REFUSALS:
        return
    seen.add(origin)
    log.warning(
        "refused a browser page's call to %s %s: %s",
        request.headers.get("Access-Control-Request-Method", "?"),
        request.path,
        message,
    )


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_preflight(request):
        return preflight_response(request, request.app[SETTINGS].cors_origins)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every reply (errors and event streams included) tells the browser whether the page may read it."""
    allowed = request.app[SETTINGS].cors_origins
    if "*" not in allowed:
        vary = response.headers.get("Vary")
        if not vary:
            response.headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin"
    origin = allowed_origin(request.headers.get("Origin"), allowed)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
