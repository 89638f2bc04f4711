"""How a request labels its jobs for the engine: which lane, and which client it comes from.

The lane comes from a ``priority`` field (JSON body or form field) or, failing that, an
``X-Priority`` header, else the route's default (interactive for single-image requests, bulk
for ``/batch_caption``). Bulk clients take turns by client key: the peer address, plus the
``X-Client-Id`` header when one is sent (two folder runs on one host then share fairly too).
The request's ``keep_alive`` (:mod:`vision_server.api.keep_alive`) travels with the labels.
"""

from __future__ import annotations

from aiohttp import web

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.api.keep_alive import keep_alive_for
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


def client_key(request: web.Request) -> str:
    """Whom a job belongs to, for the bulk lane's turns: address, and client id when sent."""
    address = request.remote or "-"
    client_id = request.headers.get(CLIENT_HEADER, "").strip()[:MAX_CLIENT_ID]
    return f"{address}/{client_id}" if client_id else address


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
        client=client_key(request),
        keep_alive=keep_alive_for(request, request.app[ENGINE], keep_alive),
    )
