"""One access-log line and one latency observation per request, whatever the route or outcome.

This middleware sits outside the error middleware, so it sees the final status of every reply
(family-shaped errors included). It opens the request's :class:`JobTrace`, which the engine fills
in, so the line also says how long the request's jobs queued and how big their batch was. It logs
metadata only: never bodies, images or headers. The client is ``request.remote``: behind a trusted
proxy (``--trusted-proxy``) the address the proxy names, with the proxy itself as ``via``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from vision_server.api.errors import ERROR_CODE, REQUEST_ID, Handler
from vision_server.api.proxies import PEER
from vision_server.api.served_model import SERVED_MODEL
from vision_server.api.state import METRICS
from vision_server.engine.trace import CURRENT_TRACE, JobTrace

log = logging.getLogger("vision_server.access")

CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the reply"
# Set by a handler that saw the client leave and ended on its own: a stream whose write met the
# closed connection returns its (already sent) 200 response, but the client never got the reply.
CLIENT_LEFT = web.RequestKey("client_left", bool)
PROBE_ROUTES = frozenset({"ops.health", "ops.ready", "ops.metrics"})
# Asked over and over by machines: the probes, and the web page's status poll (every second while
# a tab is open), so their successful answers log at debug. (Only the probes skip the rate limit.)
QUIET_ROUTES = PROBE_ROUTES | {"ui.status"}
_MAX_PATH = 200


def route_name(request: web.Request) -> str:
    """The route's name (low cardinality); ``unmatched`` for 404s and 405s."""
    return request.match_info.route.name or "unmatched"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    trace = JobTrace()
    token = CURRENT_TRACE.set(trace)
    status = 500
    try:
        response = await handler(request)
        status = CLIENT_CLOSED if client_left(request, response) else response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        CURRENT_TRACE.reset(token)
        seconds = time.perf_counter() - started
        route = route_name(request)
        request.app[METRICS].request_finished(route, status, seconds)
        log_access(request, route, status, seconds, trace)


def left_early(request: web.Request) -> None:
    """Mark the request as one whose client went away mid-reply (a write met the closed
    connection): logged and counted as 499, not as the status its first line said."""
    request[CLIENT_LEFT] = True


async def deliver(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send ``response`` whole before the handler returns, so that this middleware sees whether
    it arrived: a response returned unsent is written by aiohttp after the middlewares, and a
    download the client left halfway (a gallery file, an export) was logged and counted as a
    200. A client that leaves is :func:`left_early` (a cancelled handler is a 499 already)."""
    response.headers["X-Request-ID"] = request.get(REQUEST_ID, "-")  # set before it is sent
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:  # reset, or a broken pipe under sendfile
        left_early(request)
    return response


class FileDownload(web.FileResponse):
    """A file response :func:`deliver` can send: aiohttp prepares whatever a handler returns once
    more (a no-op for a response already sent), but a plain ``FileResponse`` opens its file again
    and fails an assertion in aiohttp, logged with a traceback."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def client_left(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether the client went away before ``response`` reached it: a stream that saw it leave
    (:data:`CLIENT_LEFT`), or a reply not yet sent on a connection already gone (a server whose
    handlers are not cancelled when the client leaves, as ``web.run_app`` serves by default).
    Counted as 499 like a handler cancelled by the hang-up, so the status never depends on which
    of the two noticed first."""
    if request.get(CLIENT_LEFT, False):
        return True
    transport = request.transport
    return not response.prepared and (transport is None or transport.is_closing())


def log_access(request: web.Request, route: str, status: int, seconds: float, trace: JobTrace) -> None:
    """Probes log at debug level: a load balancer checking every second would drown the rest.
    A refused one (a scraper without the key for ``--metrics-require-key``, a ``Host`` the server
    does not answer) is a misconfiguration to fix, so it logs at info like any other request.
    A probe's 503 (``/ready`` while starting or draining) is its answer, not a failure, so it logs
    at info too. Any other 5xx (a timeout, a model that cannot load, a full queue, a bug, also in
    a probe) logs at warning, so a server run at ``--log-level warning`` still shows its failures."""
    if status >= 500 and not (route in QUIET_ROUTES and status == 503):  # ours: kept at warning
        level = logging.WARNING
    elif route in QUIET_ROUTES and status < 400:
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    fields = {
        "request_id": request.get(REQUEST_ID, "-"),
        "method": request.method,
        "path": request.path[:_MAX_PATH],
        "route": route,
        "status": status,
        "duration": round(seconds, 4),
        "queue_wait": round(trace.queue_wait, 4) if trace.jobs else None,
        "batch_size": trace.batch_size if trace.jobs else None,
        "client": request.remote,
        "via": request.get(PEER),
        "model": request.get(SERVED_MODEL),  # the served model its image went to (several: which)
        "error": request.get(ERROR_CODE),  # why a 4xx/5xx (or a stream that failed after its start)
    }
    via_part = f" via={fields['via']}" if fields["via"] else ""
    engine_part = f" queue_wait={trace.queue_wait:.3f}s batch={trace.batch_size}" if trace.jobs else ""
    model_part = f" model={fields['model']}" if fields["model"] is not None else ""
    error_part = f" error={fields['error']}" if fields["error"] is not None else ""
    log.log(
        level,
        "%s %s %d %.3fs route=%s id=%s client=%s%s%s%s%s",
        request.method,
        fields["path"],
        status,
        seconds,
        route,
        fields["request_id"],
        request.remote,
        via_part,
        engine_part,
        model_part,
        error_part,
        extra=fields,
    )
