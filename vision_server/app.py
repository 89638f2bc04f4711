"""The aiohttp application: API families over one engine, resources owned by ``cleanup_ctx``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import web

from vision_server.api import admin, auth, cors, extras, multipart, native, openai, ops, ratelimit
from vision_server.api.access import access_middleware
from vision_server.api.errors import ERROR_FORMATTERS, error_middleware
from vision_server.api.state import DECODER, ENGINE, METRICS, SETTINGS, STARTED_AT
from vision_server.captioner import Captioner
from vision_server.engine.observer import EngineObserver, ObserverGroup
from vision_server.engine.scheduler import Engine
from vision_server.images import ImageDecoder
from vision_server.metrics import Metrics
from vision_server.runtime import build_captioner, engine_config
from vision_server.settings import Settings


def create_app(
    settings: Settings, captioner: Captioner | None = None, observer: EngineObserver | None = None
) -> web.Application:
    """Build the server. Pass ``captioner`` to serve something other than ``settings.model``."""
    captioner = captioner if captioner is not None else build_captioner(settings)
    metrics = Metrics(model=captioner.model_id)
    middlewares = [access_middleware, error_middleware]
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=middlewares)
    app[METRICS] = metrics
    app[SETTINGS] = settings
    engine_observer = metrics if observer is None else ObserverGroup(metrics, observer)
    app[ENGINE] = Engine(captioner, engine_config(settings, captioner), engine_observer)
    metrics.watch(app[ENGINE])
    app[ERROR_FORMATTERS] = {}
    app[STARTED_AT] = time.time()
    app.cleanup_ctx.append(_decoder_context)
    app.cleanup_ctx.append(_engine_context)
    app.on_shutdown.append(_drain)
    native.setup(app)
    ops.setup(app)
    admin.setup(app)
    ratelimit.setup(app, settings.rate_limit)
    auth.setup(app, settings)
    openai.setup(app)
    extras.setup(app)
    multipart.setup(app)
    cors.setup(app)
    return app


async def _decoder_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[DECODER] = ImageDecoder(max_pixels=settings.max_image_pixels, threads=settings.decode_threads)
    yield
    app[DECODER].close()


async def _engine_context(app: web.Application) -> AsyncIterator[None]:
    await app[ENGINE].start(preload=app[SETTINGS].preload)
    yield
    await app[ENGINE].stop(grace=0)


async def _drain(app: web.Application) -> None:
    """On shutdown: refuse new jobs, let queued and running ones finish within the grace period."""
    await app[ENGINE].stop(grace=app[SETTINGS].shutdown_grace)
