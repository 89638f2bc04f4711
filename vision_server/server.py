"""Running the application as a process: logging, TLS, signals, systemd notification, graceful drain.

The shutdown order is what a load balancer needs to see. On the first SIGTERM/SIGINT (Ctrl+C or
Ctrl+Break on Windows) the server keeps listening while ``/ready`` answers 503 and new jobs are
refused; queued and running jobs finish within ``--shutdown-grace``; the model is unloaded; only
then do the sockets close and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
import sys

from aiohttp import web

from vision_server import __version__
from vision_server.api.auth import KEYS
from vision_server.api.auth import is_loopback as address_is_loopback
from vision_server.api.state import ENGINE, SETTINGS, UPLOADS
from vision_server.app import create_app
from vision_server.byte_sizes import format_byte_size
from vision_server.captioner import Captioner
from vision_server.engine.lifecycle import EngineStatus
from vision_server.engine.scheduler import Engine
from vision_server.florence.source import source_problem
from vision_server.logs import configure_logging
from vision_server.model_specs import ModelSpec, adapter_identity
from vision_server.runtime import check_cache_dir
from vision_server.sdnotify import Notifier
from vision_server.settings import Settings, SettingsError
from vision_server.signals import install_stop_handlers

log = logging.getLogger("vision_server")

STATUS_INTERVAL = 1.0  # seconds between checks for a changed systemd STATUS= line
CLOSE_TIMEOUT = 10.0  # seconds for connections to finish once the jobs are done


class _PassphraseNeeded(Exception):
    """OpenSSL asked for the key's passphrase (raised by the callback, so it never prompts)."""


def _no_passphrase() -> str:
    raise _PassphraseNeeded


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context; every way the files can be wrong is a start error naming them.

    Without a password callback OpenSSL asks for an encrypted key's passphrase on the terminal:
    a foreground start hangs at "Enter PEM pass phrase:" and a service fails with "Invalid
    argument". A server cannot type a passphrase, so that is an error that says what to do.
    """
    if settings.ssl_cert is None or settings.ssl_key is None:
        return None
    cert, key = settings.ssl_cert, settings.ssl_key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _PassphraseNeeded:
        raise SettingsError(
            f"ssl_key {key} is encrypted with a passphrase, which the server cannot ask for at "
            f"start; give it a decrypted copy (openssl pkey -in {key} -out server-key.pem) that "
            "only the server's user can read",
            setting="ssl_key",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"cannot use ssl_cert {cert} / ssl_key {key}: {exc}{_tls_hint(cert, key, exc)}",
            setting=("ssl_cert", "ssl_key"),
        ) from None
    return context


def _tls_hint(cert: os.PathLike[str] | str, key: os.PathLike[str] | str, exc: Exception) -> str:
    """Which of the two files OpenSSL's error is about ("PEM lib", "key values mismatch" and
    "No such file" name neither), and what is wrong with it."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return "; ssl_key is not the private key of that certificate"
    for name, path, marker, what in (
        ("ssl_cert", cert, "-----BEGIN CERTIFICATE-----", "PEM certificate"),
        ("ssl_key", key, "PRIVATE KEY-----", "PEM private key"),
    ):
        try:
            with open(path, encoding="ascii", errors="replace") as file:
                text = file.read(1 << 20)
        except OSError as error:
            return f" ({name} {path}: {error.strerror or error})"
        if marker not in text:
            return f"; {name} {path} holds no {what} (swapped with the other file, or in DER form)"
    return ""


def describe(status: EngineStatus, *, draining: bool = False) -> str:
    """The one-line state shown by ``systemctl status`` (each model's state when there are several)."""
    if len(status.models) > 1:
        states = ", ".join(f"{model.name} {model.state.value}" for model in status.models)
        text = f"models {states}; queue {status.queue_depth}, running {status.jobs_running}"
    else:
        text = f"model {status.state.value}, queue {status.queue_depth}, running {status.jobs_running}"
    return f"draining: {text}" if status.draining or draining else text


class StopRequest:
    """The first stop signal starts the drain; a second one ends the process at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None

    def __call__(self, signum: int) -> None:
        if self.event.is_set():
            log.warning("second stop signal (%d): exiting now without finishing queued jobs", signum)
            _flush_logs()
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()


# Bind failures that the port causes (taken, or below 1024 without the right); the rest (a name
# that does not resolve, an address not on this machine) are the host's.
_PORT_ERRORS = (errno.EADDRINUSE, errno.EACCES)


async def listen(runner: web.AppRunner, settings: Settings) -> list[str]:
    """Open the listening socket; returns the URLs actually bound (port 0 picks a free port)."""
    context = ssl_context(settings)
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        raise SettingsError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            setting="port" if exc.errno in _PORT_ERRORS else "host",
        ) from None
    scheme = "https" if context else "http"
    return [_url(scheme, address) for address in runner.addresses]


def is_loopback(address: object) -> bool:
    """Whether a bound address (``runner.addresses`` entry) is reachable from this machine only."""
    host = address[0] if isinstance(address, tuple) and address else address
    return address_is_loopback(str(host))


def _url(scheme: str, address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{address[1]}"
    return f"{scheme}://{address}"


async def report_status(engine: Engine, notifier: Notifier) -> None:
    """Keep systemd's STATUS= line current (sent only when it changes)."""
    last = ""
    while True:
        text = describe(engine.status())
        if text != last:
            notifier.status(text)
            last = text
        await asyncio.sleep(STATUS_INTERVAL)


async def run(app: web.Application, notifier: Notifier | None = None) -> bool:
    """Serve ``app`` until a stop signal, then drain, unload and close.

    Returns False when the drain had to leave the model thread busy (a load that outlasted
    ``--shutdown-grace``): the caller then exits without waiting for it.
    """
    engine = app[ENGINE]
    notifier = notifier if notifier is not None else Notifier.from_environ()
    stop = StopRequest()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=CLOSE_TIMEOUT)
    # Handlers first: a signal during a --preload load is honoured as soon as the server is up.
    remove_handlers = install_stop_handlers(asyncio.get_running_loop(), stop)
    status_task: asyncio.Task[None] | None = None
    clean = True
    try:
        await runner.setup()
        await _listen(runner, app)
        notifier.ready(describe(engine.status()))
        if notifier.enabled:
            status_task = asyncio.create_task(report_status(engine, notifier))
        await stop.event.wait()
        clean = await _drain(app, stop, notifier)
    finally:
        if status_task is not None:
            status_task.cancel()
        await runner.cleanup()
        remove_handlers()
    log.info("stopped")
    return clean


async def _listen(runner: web.AppRunner, app: web.Application) -> None:
    """Bind every configured address and say where, and which ``Host`` names it answers; warn
    when an open port has no API key, and when every web page may call a server that has none."""
    urls = await listen(runner, app[SETTINGS])
    for url in urls:
        log.info("listening on %s", url)
    allowed = app[SETTINGS].allowed_host_names
    if allowed.enabled:
        # Said once at start: otherwise the first sign of the DNS-rebinding check is a 403 for a
        # proxy or a hosts-file name the operator expected to work.
        log.info(
            "answering only requests whose Host is one of: %s (DNS-rebinding check); to reach the "
            "server by another name, add --allowed-host NAME (.example.com for a domain and its "
            "subdomains, '*' for any name)",
            allowed.describe(),
        )
    if app[KEYS].api is None and not all(is_loopback(address) for address in runner.addresses):
        log.warning(
            "no --api-key: anyone who can reach %s may caption and see the server's status; "
            "set one (or bind 127.0.0.1) unless a firewall or proxy guards the port",
            " and ".join(urls),
        )
    if app[KEYS].api is None and "*" in app[SETTINGS].cors_origins:
        log.warning(
            "--cors-origin '*' and no --api-key: every web page open in a browser that can reach "
            "%s may call it and read the answers (captions, the gallery), loopback or not; "
            "name the origins that need it, or set --api-key",
            " and ".join(urls),
        )


async def _drain(app: web.Application, stop: StopRequest, notifier: Notifier) -> bool:
    """After a stop signal: refuse new work, answer bodies still arriving 503, let the engine
    finish what it holds within ``--shutdown-grace``; False when the model thread stayed busy."""
    settings, engine = app[SETTINGS], app[ENGINE]
    snapshot = engine.status()
    log.info(
        "stop signal %s: draining (%d queued, %d running; grace %gs); /ready now answers 503",
        stop.signum,
        snapshot.queue_depth,
        snapshot.jobs_running,
        settings.shutdown_grace,
    )
    notifier.stopping(describe(snapshot, draining=True))
    if cut := app[UPLOADS].cut_short():
        log.info("stop signal: %d request bod%s still arriving got 503", cut, "y" if cut == 1 else "ies")
    clean = await engine.stop(grace=settings.shutdown_grace)
    log.info("drained; closing connections")
    return clean


def served_models(settings: Settings) -> str:
    """The configured models for the start line: names, sources (with the revision they load),
    adapters, backends other than auto, own idle timeouts, the default and the memory budget."""
    parts = []
    for spec in settings.model_specs:
        text = described(spec)
        if spec.idle_timeout is not None:
            text += f" [idle timeout {spec.idle_timeout:g}s]"
        if len(settings.model_specs) > 1 and spec.name == settings.default_model_name:
            text += " [default]"
        parts.append(text)
    budget = settings.memory_budget_bytes
    shown = ", ".join(parts)
    return shown if budget is None else f"{shown} within {format_byte_size(budget)}"


def described(spec: ModelSpec) -> str:
    """``name (source @ revision + adapter, backend B)``; the parts that are not set are left
    out, and so is the name when it is the source (``source @ revision (backend B)``)."""
    source = spec.source if spec.revision is None else f"{spec.source} @ {spec.revision}"
    # the adapter's full path (clients see only its folder name: the log is where to find it)
    shown = source if spec.adapter is None else f"{source} + {adapter_identity(spec.adapter)}"
    backend = f"backend {spec.backend}" if spec.backend != "auto" else None
    if spec.name != spec.source:
        return f"{spec.name} ({shown}{f', {backend}' if backend else ''})"
    return f"{shown} ({backend})" if backend else shown


def check_model_sources(settings: Settings) -> None:
    """Refuse to start when a configured model can never load (a missing local directory, a file,
    an unknown test model): the operator hears it now, not from the first request."""
    problems = [
        f"model {spec.name}: {problem}" if len(settings.model_specs) > 1 else problem
        for spec in settings.model_specs
        if (problem := source_problem(spec.source)) is not None
    ]
    if problems:
        raise SettingsError("; ".join(problems), setting="model")


def serve(settings: Settings, captioner: Captioner | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain queued jobs within ``shutdown_grace`` and return."""
    try:
        configure_logging(settings.log_level, settings.log_format, settings.log_file)
        if "torch" not in sys.modules:  # said first: the model libraries take seconds to import
            log.info("starting vision-server %s (pid %d), loading libraries", __version__, os.getpid())
        ssl_context(settings)  # a bad certificate or key stops the start before any model loads
        if captioner is None:
            check_model_sources(settings)
            check_cache_dir(settings)
        app = create_app(settings, captioner)
        log.info(
            "vision-server %s serving %s (idle timeout %gs, pid %d)",
            __version__,
            served_models(settings) if captioner is None else app[ENGINE].model_card.model_id,
            settings.idle_timeout,
            os.getpid(),
        )
        if not asyncio.run(run(app)):
            log.warning("exiting while the model thread is still busy (shutdown grace exceeded)")
            _flush_logs()
            os._exit(0)  # a plain exit would join the busy model thread and outlast the stop timeout
    except SettingsError as exc:
        log.error("%s", settings.located(exc))
        raise SystemExit(2) from None
