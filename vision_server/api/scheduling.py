"""How a request labels its jobs for the engine: which lane, and which client it comes from.

The lane comes from a ``priority`` field (JSON body or form field) or, failing that, an
``X-Priority`` header, else the route's default (interactive for single-image requests, bulk
for ``/batch_caption``). Bulk work takes turns by host (the peer address) and, inside one host, by
the ``X-Client-Id`` header (two folder runs on one host then share its turn fairly; sending many
ids gains a host nothing). The API key is one shared secret, so it names no client and cannot
stand in for the host. The host is ``request.remote``: behind a reverse proxy that is the proxy's
address, so its clients share one turn and only their client ids tell them apart, unless the proxy
is named with ``--trusted-proxy`` (:mod:`vision_server.api.proxies`); then it is the client the
proxy names. An IPv6 host counts by its /64 network, as for the rate limit
(:func:`vision_server.api.ratelimit.bucket_of`): it may send from any address of it, and a fresh
address per request must not buy it a turn per request.
The request's ``keep_alive`` (:mod:`vision_server.api.keep_alive`) travels with the labels.
"""

from __future__ import annotations

from aiohttp import web

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.api.keep_alive import keep_alive_for
from vision_server.api.ratelimit import bucket_of
from vision_server.api.state import ENGINE
from vision_server.engine.jobs import JobLabels, Lane

PRIORITY_HEADER = "X-Priority"
CLIENT_HEADER = "X-Client-Id"
MAX_CLIENT_ID = 128


def lane_for(request: web.Request, value: object, default: Lane) -> Lane:
    """The lane a request asks for: its ``priority`` field, else its header, else ``default``."""
    if value is not None and value != "":
        if not isinstance(value, str):
            raise InvalidParameter("priority", f"'priority' must be a string, not {type(value).__name__}.")
        return _parse("priority", value)
    header = request.headers.get(PRIORITY_HEADER, "").strip()
    return _parse(PRIORITY_HEADER, header) if header else default


def _parse(name: str, value: str) -> Lane:
    try:
        return Lane.parse(value)
    except ValueError:
        raise InvalidParameter(
            "priority", f"{name} must be 'interactive' or 'bulk', not {shown(value)}."
        ) from None


def client_id(request: web.Request) -> str:
    """The ``X-Client-Id`` header (trimmed, at most 128 characters); "" when none is sent."""
    return request.headers.get(CLIENT_HEADER, "").strip()[:MAX_CLIENT_ID]


def job_labels(
    request: web.Request,
    priority: object = None,
    *,
    default: Lane = Lane.INTERACTIVE,
    keep_alive: object = None,
) -> JobLabels:
    """The labels of a request's jobs (400 for an unknown priority or a bad keep-alive)."""
    return JobLabels(
        lane=lane_for(request, priority, default),
        host=bucket_of(request.remote),
        client_id=client_id(request),
        keep_alive=keep_alive_for(request, request.app[ENGINE], keep_alive),
    )
