"""Admin routes: load, unload or offload (to the warm tier in host memory) the model now.

Both are messages to the engine's worker, handled between batches, so an unload never cuts a
running request short. They answer with the engine status afterwards, exactly as ``/v1/status``
shows it (adapters by folder name, never by path).
With several models served, ``?model=NAME`` (or ``{"model": NAME}`` in a JSON body) names the
one to act on (a served name or source; 404 for any other); without it, the default model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.auth import admin_only
from vision_server.api.bodies import read_body, read_json_object
from vision_server.api.model_choice import MODEL_PARAM, model_field, resolve_exact
from vision_server.api.ops import status_body
from vision_server.api.state import ENGINE
from vision_server.engine.lifecycle import EngineStatus
from vision_server.engine.scheduler import Engine
from vision_server.errors import Draining


def _refuse_while_draining(request: web.Request) -> None:
    if request.app[ENGINE].draining:
        raise Draining("The server is shutting down; the model will be unloaded.", retry_after=5)


async def named_model(request: web.Request) -> str:
    """The served model an admin request names (query or JSON body; the default without one)."""
    value: object = request.query.get(MODEL_PARAM)
    if value is None and await read_body(request):  # no body at all, as before: the default model
        value = (await read_json_object(request)).get(MODEL_PARAM)
    return resolve_exact(request.app, model_field(value))


AdminAction = Callable[[Engine, str], Awaitable[EngineStatus]]


async def _act(request: web.Request, action: AdminAction) -> web.Response:
    """Run one admin action on the model the request names; answer the engine status after it."""
    model = await named_model(request)
    _refuse_while_draining(request)
    status = await action(request.app[ENGINE], model)
    return web.json_response(status_body(request.app, status))


@admin_only
async def load_model(request: web.Request) -> web.Response:
    """Load now (a no-op when loaded); 503 with the reason when the load fails."""
    return await _act(request, Engine.load)


@admin_only
async def unload_model(request: web.Request) -> web.Response:
    """Unload once the batch running now (if any) is done; queued jobs load it again."""
    return await _act(request, Engine.unload)


@admin_only
async def offload_model(request: web.Request) -> web.Response:
    """Move the model to host memory now (the warm tier); 400 where there is none."""
    return await _act(request, Engine.offload)


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes; they answer errors in the ops shape (see :func:`vision_server.app.create_app`)."""
    return [
        app.router.add_post("/v1/model/load", load_model, name="ops.model_load"),
        app.router.add_post("/v1/model/unload", unload_model, name="ops.model_unload"),
        app.router.add_post("/v1/model/offload", offload_model, name="ops.model_offload"),
    ]
