"""Refuse requests addressed to a name the server is not known by (DNS rebinding).

Without an API key (the loopback default) a page that rebinds its own name to ``127.0.0.1``
could read everything the server answers: captions, ``/v1/status``, a gallery's images and
captions (and write them with ``--gallery-writable``). The cross-site check
(:mod:`vision_server.api.cross_site`) cannot see it: to the browser the page is same-origin. Its
``Host`` header still names the page's domain, so a request whose ``Host`` is neither loopback,
an address, nor an ``--allowed-host`` is refused (:mod:`vision_server.allowed_hosts` says which
names pass, and when the check is on).

The refusal is a 403, like the cross-site check's and like Jupyter's and Vite's for the same
check: every family already answers ``Forbidden`` in its own shape, and the fix is a setting, not
another connection. 421 (Misdirected Request) tells an HTTP/2 client to retry on a new
connection, which here would only repeat the refusal.

A reverse proxy on the same machine that forwards the public name (Caddy and HAProxy do; nginx
only with ``proxy_set_header Host $host``) is refused like anyone else, with a message naming
``--allowed-host``; peers named by ``--trusted-proxy`` are *not* exempt. A proxy in front of a
loopback server connects from loopback, so exempting it would exempt every local connection,
the rebound browser's included, and ``X-Forwarded-For`` cannot tell them apart: a same-origin
page may set that header itself. Naming the proxy's public host once is the fix.

``/health`` and ``/ready`` answer whatever the ``Host`` (they tell a page nothing): a probe
that names the machine or a pod address must keep working. The first refusal of each name is
logged, so an operator whose proxy forwards a name the server does not know finds the fix in
the server's log too.
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from vision_server.allowed_hosts import host_name
from vision_server.api.access import route_name
from vision_server.api.errors import Handler
from vision_server.api.state import METRICS, SETTINGS
from vision_server.errors import Forbidden

PROBE_ROUTES = frozenset({"ops.health", "ops.ready"})
REFUSED_HOSTS = web.AppKey("refused_hosts", set[str])  # names whose refusal was logged
MAX_LOGGED_REFUSALS = 100  # a client cannot fill the log by inventing names
_SHOWN = 100  # characters of a refused Host header repeated in the message

log = logging.getLogger("vision_server")


def refused_host(request: web.Request) -> str | None:
    """The first ``Host`` header value the server does not answer, or None."""
    if route_name(request) in PROBE_ROUTES:
        return None
    allowed = request.app[SETTINGS].allowed_host_names
    return next((value for value in request.headers.getall(hdrs.HOST, ()) if not allowed.allows(value)), None)


@web.middleware
async def host_check_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = refused_host(request)
    if host is not None:
        request.app[METRICS].request_rejected("forbidden")
        shown = host if len(host) <= _SHOWN else host[:_SHOWN] + "..."
        name = host_name(host)[:_SHOWN] or "NAME"
        message = (
            f"Refused a request for host {shown!r}: this server answers only localhost, IP "
            "addresses and the names --allowed-host gives, so that no web page can reach it by "
            "DNS rebinding. If that is this server's name (a reverse proxy or hosts file gives it), "
            f"start the server with --allowed-host {name}."
        )
        _log_first_refusal(request, name, message)
        raise Forbidden(message)
    return await handler(request)


def _log_first_refusal(request: web.Request, name: str, message: str) -> None:
    seen = request.app.get(REFUSED_HOSTS)
    if seen is None or name in seen or len(seen) >= MAX_LOGGED_REFUSALS:
        return
    seen.add(name)
    log.warning("%s %s: %s", request.method, request.path, message)
