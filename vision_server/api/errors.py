"""Errors over HTTP: the HTTP-only error classes, request ids, and each family's error shape.

Domain errors live in :mod:`vision_server.errors`; the classes here only make sense for a
request (a missing field, an unknown route). :func:`vision_server.app.create_app` registers
each API family's routes with that family's formatter in :class:`ErrorShapes`, so the error
middleware answers every failure in the shape the route's clients expect.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, AbstractRoute

from vision_server.errors import BadRequest, PayloadTooLarge, VisionServerError

log = logging.getLogger("vision_server.api")

ErrorFormatter = Callable[[VisionServerError, str], web.Response]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = web.RequestKey("request_id", str)
# The code of the error a request was answered with (invalid_image, queue_full ...), for its access line.
ERROR_CODE = web.RequestKey("error_code", str)
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


class MissingField(BadRequest):
    """A required field is absent (the native family answers 422 for this, like FastAPI)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Field required: {name!r}")
        self.field = name


class InvalidParameter(BadRequest):
    """A request field has a wrong type or value; ``param`` names it (OpenAI replies carry it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ErrorShapes:
    """Which formatter shapes the errors of each route; ``fallback`` for unmatched paths (404, 405),
    unless one of ``by_prefix`` starts the path (under ``/v1/`` an OpenAI client expects
    ``{"error": {...}}``, not the native ``{"detail"}``).

    Keyed by resource (a path), so a route's automatic HEAD twin answers in the same shape.
    """

    def __init__(self, fallback: ErrorFormatter, by_prefix: dict[str, ErrorFormatter] | None = None) -> None:
        self.fallback = fallback
        self._by_prefix = dict(by_prefix or {})
        self._by_resource: dict[AbstractResource, ErrorFormatter] = {}

    def register(self, routes: Iterable[AbstractRoute], formatter: ErrorFormatter) -> None:
        for route in routes:
            if route.resource is None:
                raise ValueError(f"route {route.name!r} has no resource to register")
            known = self._by_resource.setdefault(route.resource, formatter)
            if known is not formatter:
                raise ValueError(f"{route.resource.canonical} already answers errors in another shape")

    def is_registered(self, route: AbstractRoute) -> bool:
        return route.resource is not None and route.resource in self._by_resource

    def formatter_for(self, route: AbstractRoute, path: str = "") -> ErrorFormatter:
        """The route's formatter; for a 405 (no route matched the method) the one of the resource
        at ``path``, so ``PUT /v1/chat/completions`` still answers in the OpenAI shape."""
        resource = route.resource
        if resource is not None:
            return self._by_resource.get(resource, self.fallback)
        known = (formatter for resource, formatter in self._by_resource.items() if resource.raw_match(path))
        return next(known, None) or self.fallback_for(path)

    def fallback_for(self, path: str) -> ErrorFormatter:
        """The shape of a path no resource matches: the longest registered prefix's, else the fallback."""
        prefixes = sorted((p for p in self._by_prefix if path.startswith(p)), key=len, reverse=True)
        return self._by_prefix[prefixes[0]] if prefixes else self.fallback


ERROR_SHAPES = web.AppKey("error_shapes", ErrorShapes)


def request_id_for(request: web.Request) -> str:
    """Reuse a well-formed incoming ``X-Request-ID`` (proxies set one), else make one."""
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex[:16]


def with_error_headers(response: web.Response, error: VisionServerError) -> web.Response:
    """The reply with the headers ``error`` asks for (``Retry-After``, and its own)."""
    response.headers.update(error.reply_headers)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return response


def error_response(
    request: web.Request, error: VisionServerError, meant: tuple[AbstractRoute, str] | None = None
) -> web.Response:
    """``error`` in the shape of the route's family (for a path that matched nothing, of the
    route it was ``meant`` as, when there is one)."""
    route, path = meant or (request.match_info.route, request.path)
    formatter = request.app[ERROR_SHAPES].formatter_for(route, path)
    request[ERROR_CODE] = error.code
    return with_error_headers(formatter(error, request.get(REQUEST_ID, "-")), error)


async def meant_route(request: web.Request) -> tuple[AbstractRoute, str] | None:
    """The served route (and its path) an unmatched path was probably meant as, or None.

    Tools build their URLs as ``base + "/chat/completions"``, so a base URL with a ``/`` at its
    end gives ``/v1//chat/completions``, a base that already ends in ``/v1`` given to a tool
    that adds its own gives ``/v1/v1/...``, and the OpenAI base URL given to a native client
    (``vision-client --url http://host:54880/v1``) gives ``/v1/process_image``; the bare 404
    said nothing about any of them.
    """
    tidy = re.sub(r"/{2,}", "/", request.path)
    tidy = re.sub(r"^(?:/v1)+/", "/v1/", tidy)
    if len(tidy) > 1:
        tidy = tidy.rstrip("/")
    candidates = [tidy] if tidy != request.path else []
    if tidy.startswith("/v1/"):
        candidates.append(tidy[len("/v1") :])
    for path in candidates:
        match = await request.app.router.resolve(request.clone(rel_url=path))
        missing = match.http_exception
        if missing is None or missing.status == 405:
            return match.route, path
    return None


def _from_http_exception(exc: web.HTTPException) -> VisionServerError | None:
    if exc.status == 413:
        detail = (exc.text or "over the limit").rstrip(".")  # aiohttp's text ends with its own '.'
        return PayloadTooLarge(
            f"Request body too large: {detail} (--max-request-bytes). Send a smaller image."
        )
    if exc.status == 404:
        return NotFound("Not Found")
    if exc.status == 405:
        return MethodNotAllowed("Method Not Allowed")
    return None


# OpenAI API resources other than chat completions, responses and models: an OpenAI client that
# calls one is told what this server offers instead.
OTHER_OPENAI_APIS = frozenset(
    {"completions", "embeddings", "images", "audio", "files", "assistants", "threads", "batches",
     "moderations", "realtime", "vector_stores", "uploads", "fine_tuning", "conversations"}
)  # fmt: skip
CHAT_PATH = "/v1/chat/completions"


async def _unmatched(
    request: web.Request, error: VisionServerError
) -> tuple[VisionServerError, tuple[AbstractRoute, str] | None]:
    """The 404 of a path no route matched: what it was probably meant as, or (for another OpenAI
    API) what to call instead, in that family's shape; otherwise the plain ``Not Found``."""
    meant = await meant_route(request)
    if meant is not None:
        return NotFound(
            f"Not Found: {request.path} is no route of this server; did you mean {meant[1]}? "
            "Check the base URL the client was given (a '/' at its end, /v1 twice, or a /v1 "
            "where none belongs)."
        ), meant
    parts = [part for part in request.path.split("/") if part]
    api = parts[1] if parts[:1] == ["v1"] and len(parts) > 1 else parts[0] if parts else ""
    if api in OTHER_OPENAI_APIS:
        chat = await request.app.router.resolve(request.clone(rel_url=CHAT_PATH))
        return NotFound(
            f"Not Found: this server offers OpenAI's chat completions (POST {CHAT_PATH}, an "
            "image_url part per image), responses (POST /v1/responses, an input_image part per "
            f"image) and models (GET /v1/models), not {request.path}."
        ), (chat.route, CHAT_PATH)
    return error, None


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
        meant = None
        if exc.status == 404:
            error, meant = await _unmatched(request, error)
        response = error_response(request, error, meant)
        if "Allow" in exc.headers:  # a 405 must say which methods the route takes
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception(
            "unhandled error in %s %s (request id %s)",
            request.method,
            request.path,
            request_id,
            extra={"request_id": request_id},
        )
        message = f"Internal server error (request id {request_id}); the server log has the details."
        response = error_response(request, InternalError(message))
    response.headers["X-Request-ID"] = request_id
    return response
