"""Request ids and error replies: every family answers errors in its own shape.

Routes are named ``<family>.<name>``; the middleware looks the family up in the app's
formatter table, so each family module registers one function that shapes its errors.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from vision_server.errors import PayloadTooLarge, VisionServerError

log = logging.getLogger("vision_server.api")

ErrorFormatter = Callable[[VisionServerError, str], web.Response]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = web.RequestKey("request_id", str)
ERROR_FORMATTERS = web.AppKey("error_formatters", dict[str, ErrorFormatter])
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class InternalError(VisionServerError):
    status = 500
    code = "internal_error"


class NotFound(VisionServerError):
    status = 404
    code = "not_found"


class MethodNotAllowed(VisionServerError):
    status = 405
    code = "method_not_allowed"


def request_id_for(request: web.Request) -> str:
    """Reuse a well-formed incoming ``X-Request-ID`` (proxies set one), else make one."""
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex[:16]


def family_of(request: web.Request) -> str:
    name = request.match_info.route.name or ""
    return name.split(".", 1)[0] if "." in name else "native"


def with_retry_after(response: web.Response, error: VisionServerError) -> web.Response:
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return response


def error_response(request: web.Request, error: VisionServerError) -> web.Response:
    formatters = request.app[ERROR_FORMATTERS]
    formatter = formatters.get(family_of(request)) or formatters["native"]
    return with_retry_after(formatter(error, request.get(REQUEST_ID, "-")), error)


def _from_http_exception(exc: web.HTTPException) -> VisionServerError | None:
    if exc.status == 413:
        return PayloadTooLarge(
            f"Request body too large: {exc.text or 'over the limit'}. Send a smaller image."
        )
    if exc.status == 404:
        return NotFound("Not Found")
    if exc.status == 405:
        return MethodNotAllowed("Method Not Allowed")
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach a request id, and turn every failure into the family's error shape."""
    request_id = request_id_for(request)
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except VisionServerError as exc:
        response = error_response(request, exc)
    except web.HTTPException as exc:
        error = _from_http_exception(exc)
        if error is None:
            raise
        response = error_response(request, error)
    except Exception:
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request_id)
        message = f"Internal server error (request id {request_id}); the server log has the details."
        response = error_response(request, InternalError(message))
    response.headers["X-Request-ID"] = request_id
    return response
