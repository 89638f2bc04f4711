"""Operational routes: status for people and tools."""

from __future__ import annotations

from aiohttp import web

from vision_server.api.errors import ERROR_FORMATTERS
from vision_server.api.state import CAPTIONER, ENGINE
from vision_server.errors import VisionServerError


def ops_error(error: VisionServerError, request_id: str) -> web.Response:
    body = {"error": {"message": error.message, "code": error.code, "request_id": request_id}}
    return web.json_response(body, status=error.status)


async def status(request: web.Request) -> web.Response:
    """State, model, device, dtype, loaded since, expires_at, queue depth, jobs running, errors."""
    data = request.app[ENGINE].status().as_dict()
    data["tasks"] = list(request.app[CAPTIONER].tasks)
    return web.json_response(data)


def setup(app: web.Application) -> None:
    app[ERROR_FORMATTERS]["ops"] = ops_error
    app.router.add_get("/v1/status", status, name="ops.status")
