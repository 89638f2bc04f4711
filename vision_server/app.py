"""The aiohttp application: API families over one engine, resources owned by ``cleanup_ctx``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from vision_server.api import (
    admin,
    auth,
    cors,
    cross_site,
    extras,
    gallery,
    host_check,
    multipart,
    native,
    openai,
    openai_responses,
    ops,
    proxies,
    ratelimit,
    ui,
)
from vision_server.api.access import access_middleware
from vision_server.api.auth import KEYS, keys_from
from vision_server.api.errors import ERROR_SHAPES, ErrorShapes, error_middleware
from vision_server.api.keep_alive import add_keep_alive_header
from vision_server.api.ratelimit import RATE_LIMITER, RateLimiter
from vision_server.api.served_model import add_model_header
from vision_server.api.server_header import set_server_header
from vision_server.api.state import (
    DECODER,
    ENGINE,
    METRICS,
    RECENT,
    SETTINGS,
    STARTED_AT,
    UPLOADS,
)
from vision_server.api.uploads import Uploads
from vision_server.captioner import Captioner
from vision_server.engine.models import NamedModel
from vision_server.engine.observer import EngineObserver, ObserverGroup
from vision_server.engine.recent import RecentBatches
from vision_server.engine.scheduler import Engine
from vision_server.images import ImageDecoder
from vision_server.metrics import Metrics
from vision_server.runtime import build_models, engine_config
from vision_server.settings import Settings

log = logging.getLogger("vision_server")


def create_app(
    settings: Settings,
    captioner: Captioner | None = None,
    observer: EngineObserver | None = None,
    *,
    models: Sequence[NamedModel] | None = None,
) -> web.Application:
    """Build the server for the configured models (:func:`vision_server.runtime.build_models`).

    Pass ``captioner`` to serve that one model instead, named after its model id, or ``models``
    to serve those (the default is then ``settings.default_model`` when set, else the first).
    """
    served, default, default_name = _served_models(settings, captioner, models)
    metrics = Metrics()
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=middlewares(settings),
        handler_args={"auto_decompress": False},  # bodies are decoded by api.encodings, in our replies
    )
    app[METRICS] = metrics
    app[SETTINGS] = settings
    app[RECENT] = RecentBatches()
    app[UPLOADS] = Uploads()
    watchers = (metrics, app[RECENT]) if observer is None else (metrics, app[RECENT], observer)
    engine_observer = ObserverGroup(*watchers)
    config = engine_config(settings, default)
    app[ENGINE] = Engine(served, config, engine_observer, default_model=default_name)
    metrics.watch(app[ENGINE])
    app[STARTED_AT] = time.time()
    app[KEYS] = keys_from(settings)
    if settings.trusted_proxy_networks:
        app[proxies.TRUSTED_PROXIES] = settings.trusted_proxy_networks
    if settings.rate_limit is not None and settings.rate_limit > 0:
        app[RATE_LIMITER] = RateLimiter(settings.rate_limit)
    app[cors.REFUSED_ORIGINS] = set()
    app[host_check.REFUSED_HOSTS] = set()
    if settings.cors_origins:
        app.on_response_prepare.append(cors.add_cors_headers)
    app.on_response_prepare.append(add_keep_alive_header)
    app.on_response_prepare.append(add_model_header)
    app.on_response_prepare.append(set_server_header)
    app[ERROR_SHAPES] = add_routes(app)
    app.cleanup_ctx.append(_decoder_context)
    app.cleanup_ctx.append(_engine_context)
    app.on_shutdown.append(_drain)
    return app


def _served_models(
    settings: Settings, captioner: Captioner | None, models: Sequence[NamedModel] | None
) -> tuple[Captioner | Sequence[NamedModel], Captioner, str | None]:
    """What the engine serves, the default model's captioner (metrics and engine config read it),
    and the default's name (None: the engine's own choice)."""
    if captioner is not None and models is not None:
        raise TypeError("pass captioner or models, not both")
    if captioner is not None:
        return captioner, captioner, None
    named = list(models) if models is not None else build_models(settings)
    default_name = settings.default_model if settings.default_model is not None else named[0].name
    # An unknown default_model is the engine's ValueError (it names the served models).
    default = next((m.captioner for m in named if m.name == default_name), named[0].captioner)
    return named, default, default_name


def middlewares(settings: Settings) -> list[Middleware]:
    """Every middleware, outermost first: each sees the reply of the ones after it."""
    chain: list[Middleware] = []
    if settings.trusted_proxy_networks:
        # First: from here on request.remote is the client a trusted proxy names, for everyone below.
        chain.append(proxies.forwarded_client_middleware)
    # Browsers send preflights without credentials: answer them before keys, limits or logs
    # (with CORS off too, so a refused page gets a 403 that says how to allow it).
    chain.append(cors.preflight_middleware)
    # Outside the error middleware, so the access log and request metrics see the final status.
    chain.append(access_middleware)
    # Gives each request its id and turns every failure below into the route family's error shape.
    chain.append(error_middleware)
    if settings.allowed_host_names.enabled:
        # A page that rebinds its own name to this server's address reads it as same-origin: only
        # localhost, addresses and --allowed-host names are answered (on by default on loopback).
        chain.append(host_check.host_check_middleware)
    # A page on another site may make a browser POST here; refused unless --cors-origin allows it.
    chain.append(cross_site.cross_site_middleware)
    if settings.rate_limit is not None and settings.rate_limit > 0:
        # Before the key check, so a client guessing keys is slowed down too.
        chain.append(ratelimit.rate_limit_middleware)
    # The API key; a 401 is shaped here (it needs WWW-Authenticate), a 403 by the error middleware.
    chain.append(auth.auth_middleware)
    return chain


def add_routes(app: web.Application) -> ErrorShapes:
    """Every API family's routes, each family registered with the shape its clients expect errors in."""
    # Unknown paths answer like florence2-visionapi, except under /v1/, where OpenAI clients call.
    shapes = ErrorShapes(fallback=native.native_error, by_prefix={"/v1/": openai.openai_error})
    shapes.register(native.setup(app), native.native_error)
    shapes.register([*ops.setup(app), *admin.setup(app)], ops.ops_error)
    shapes.register(openai.setup(app), openai.openai_error)
    shapes.register(openai_responses.setup(app), openai.openai_error)
    shapes.register(extras.setup(app), extras.extras_error)
    shapes.register(multipart.setup(app), multipart.multipart_error)
    settings = app[SETTINGS]
    if settings.ui:
        shapes.register(ui.setup_page(app), native.native_error)  # "/" for non-browsers: as before
        shapes.register(ui.setup(app), ops.ops_error)
    if settings.ui and settings.gallery is not None:
        shapes.register(gallery.setup(app), ops.ops_error)
    elif settings.gallery is not None:
        log.warning(
            "--gallery %s is ignored: the gallery is part of the web page, off with --no-ui", settings.gallery
        )
    return shapes


async def _decoder_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = app[ENGINE]
    app[DECODER] = ImageDecoder(
        max_pixels=settings.max_image_pixels,
        spec=lambda: engine.pixel_spec,
        threads=settings.decode_threads,
    )
    yield
    app[DECODER].close()


async def _engine_context(app: web.Application) -> AsyncIterator[None]:
    await app[ENGINE].start(preload=app[SETTINGS].preload)
    yield
    await app[ENGINE].stop(grace=0)


async def _drain(app: web.Application) -> None:
    """On shutdown: refuse new jobs, let queued and running ones finish within the grace period."""
    app[UPLOADS].cut_short()
    await app[ENGINE].stop(grace=app[SETTINGS].shutdown_grace)
