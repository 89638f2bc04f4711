"""Domain errors. API adapters turn these into each family's error shape and status code.

Each error carries the HTTP status it maps to, so adapters need no per-family lookup table, and
a message written for the person who has to fix the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar


class VisionServerError(Exception):
    """Base of every error the server expects and explains."""

    status: int = 500
    code: str = "internal_error"
    # The request field at fault, when known (OpenAI replies carry it as ``param``).
    param: str | None = None
    # Headers the reply must carry besides the body (a 415's Accept-Encoding).
    reply_headers: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(VisionServerError):
    status = 400
    code = "invalid_request"


class InvalidTask(BadRequest):
    code = "invalid_task"


class InvalidImage(BadRequest):
    code = "invalid_image"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid image data: {reason}")
        self.reason = reason  # without the prefix, for lists that name the file before it


class Unauthorized(VisionServerError):
    """Missing or wrong API key; the reply carries ``WWW-Authenticate: Bearer``."""

    status = 401
    code = "unauthorized"


class Forbidden(VisionServerError):
    """The caller is known but may not do this (admin routes without the admin key)."""

    status = 403
    code = "forbidden"


class RateLimited(VisionServerError):
    """Too many requests from one client address; retry after ``retry_after`` seconds."""

    status = 429
    code = "rate_limited"


class BodyTimeout(VisionServerError):
    """The client took longer than ``--body-timeout`` to send its request body."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(VisionServerError):
    status = 413
    code = "payload_too_large"


class ServiceUnavailable(VisionServerError):
    """Temporary: the client should retry after ``retry_after`` seconds."""

    status = 503
    code = "service_unavailable"


class WorkerUnavailable(ServiceUnavailable):
    """The engine's worker died and is being restarted (ours: logged; the client may retry)."""

    code = "worker_unavailable"


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class Draining(ServiceUnavailable):
    code = "shutting_down"


class UnknownModel(VisionServerError):
    """A request named a model this server does not serve; the message lists the served names."""

    status = 404
    code = "model_not_found"


class ModelTooLarge(ServiceUnavailable):
    """A model needs more memory than ``--memory-budget`` allows even with every other model unloaded."""

    code = "model_too_large"


class ModelLoadError(ServiceUnavailable):
    """The model could not be loaded; the message says why and how to fix it."""

    code = "model_load_failed"


class OutOfMemory(ServiceUnavailable):
    code = "out_of_memory"


class CaptionFailed(VisionServerError):
    """Our fault: generation raised. The API answers 500 with the request id."""

    status = 500
    code = "caption_failed"


class DeadlineExceeded(VisionServerError):
    status = 504
    code = "timeout"


class ModelSourceError(Exception):
    """A model directory or hub id cannot be used (missing, not a model, offline, corrupt)."""


class ConversionError(ModelSourceError):
    """An original-layout Florence-2 checkpoint cannot be converted to the native layout."""
