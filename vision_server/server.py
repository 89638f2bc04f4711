"""Running the application as a process: logging, TLS, signals and graceful drain."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from vision_server import __version__
from vision_server.app import create_app
from vision_server.logs import configure_logging
from vision_server.settings import Settings

log = logging.getLogger("vision_server")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.ssl_cert is None or settings.ssl_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_cert, settings.ssl_key)
    return context


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then drain queued jobs within ``shutdown_grace`` and exit 0."""
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    app = create_app(settings)
    scheme = "https" if settings.ssl_cert else "http"
    log.info(
        "vision-server %s serving %s on %s://%s:%d (idle timeout %gs)",
        __version__,
        settings.model,
        scheme,
        settings.host,
        settings.port,
        settings.idle_timeout,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context(settings),
        shutdown_timeout=settings.shutdown_grace + 5,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )
