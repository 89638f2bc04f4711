"""Run the real aiohttp application on a real port inside a test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from aiohttp import ClientSession, web

from vision_server.app import create_app
from vision_server.captioner import Captioner
from vision_server.engine.models import NamedModel
from vision_server.settings import Settings


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, captioner: Captioner | None = None, *, models: Sequence[NamedModel] | None = None
) -> AsyncIterator[tuple[web.Application, str]]:
    """Serve ``create_app(settings, captioner)`` (or ``models``) on 127.0.0.1:<free port>; yields
    the app and base URL."""
    app = create_app(settings, captioner, models=models)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, captioner: Captioner | None = None, *, models: Sequence[NamedModel] | None = None
) -> AsyncIterator[str]:
    """Serve ``create_app(settings, captioner)`` (or ``models``) on 127.0.0.1:<free port>; yields
    the base URL."""
    async with running_app(settings, captioner, models=models) as (_, url):
        yield url


@contextlib.asynccontextmanager
async def client_for(
    settings: Settings, captioner: Captioner | None = None, *, models: Sequence[NamedModel] | None = None
) -> AsyncIterator[ClientSession]:
    """A client session whose relative URLs go to a freshly started server."""
    async with running_server(settings, captioner, models=models) as url, ClientSession(url) as session:
        yield session
