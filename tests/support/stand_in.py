"""A scriptable HTTP server for the clients' tests: what the real server will not do on demand.

It hangs (timeouts, Ctrl+C), answers 503 with a ``Retry-After`` (retries), plays a proxy whose
servers are all down for a while (bare 502/503 pages), checks a bearer key, and records every
request, so a test can read back exactly what a client sent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

# What GET /prompts answers: the server's task list.
PROMPTS = [
    "<GENERATE_TAGS>",
    "<CAPTION>",
    "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>",
    "<ANALYZE>",
    "<MIXED_CAPTION>",
    "<MIXED_CAPTION_PLUS>",
]


class Recorded(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() when the request arrived (a retry schedule's gaps)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up (timeouts, Ctrl+C) are expected here


class StandIn:
    """GET /prompts lists the tasks, GET /model names a model; every POST answers ``caption``.

    ``hang``: POSTs wait until the stand-in closes; ``busy_first``: that many POSTs get 503 with
    ``Retry-After: 1`` first (``busy_retry_after``: another value, or a function that makes it
    as each 503 is answered (an HTTP date some seconds ahead), None for none, the JSON body
    kept: the clients' own back-off; ``busy_status=502``: a 502 with a JSON body and no ``Retry-After``,
    as a server or gateway of its own answers it, not a proxy's bare page); ``key``: POSTs
    without ``Authorization: Bearer <key>`` get 401. ``model_gone_after``: once that many POSTs
    were captioned, the server is one restarted without the model the client names: a POST
    naming a model (and ``GET /prompts?model=``) gets the real server's 404 ``model_not_found``.
    ``outage_after``: once that many POSTs were captioned, every request (GETs too) gets what
    HAProxy answers while no server behind it is up, 503 and 502 in turn, an HTML page without
    ``Retry-After``, for ``outage_seconds``; then captions again (0: down from the start).
    ``prompts_status``: GET /prompts (the folder scripts' first request) answers that status
    instead (503: "Queue full" with ``Retry-After: 1``; else a JSON error); ``prompts_delay``: it
    answers that many seconds late (a timeout); the POSTs are not affected.
    """

    def __init__(
        self,
        *,
        hang: bool = False,
        busy_first: int = 0,
        busy_status: int = 503,
        busy_retry_after: str | Callable[[], str] | None = "1",
        key: str | None = None,
        caption: str = "stand-in caption",
        outage_after: int | None = None,
        outage_seconds: float = 0.0,
        model_gone_after: int | None = None,
        prompts_status: int | None = None,
        prompts_delay: float = 0.0,
    ) -> None:
        self.prompts_status, self.prompts_delay = prompts_status, prompts_delay
        self.hang, self.key, self.caption = hang, key, caption
        self.busy_left, self.busy_status, self.busy_retry_after = busy_first, busy_status, busy_retry_after
        self.model_gone_after = model_gone_after
        self.outage_after, self.outage_seconds = outage_after, outage_seconds
        self.outage_ends: float | None = None
        self.captioned = 0
        self.outage_answers = 0
        self.requests: list[Recorded] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def record(self, request: Recorded) -> None:
        with self.lock:
            self.requests.append(request)

    def take_busy(self) -> bool:
        """Whether this POST is one of the first ``busy_first`` (answered 503)."""
        with self.lock:
            busy = self.busy_left > 0
            self.busy_left -= busy
            return busy

    def in_outage(self) -> bool:
        """Whether this request meets the outage (which starts with the first request that may)."""
        with self.lock:
            if self.outage_after is None or self.captioned < self.outage_after:
                return False
            if self.outage_ends is None:
                self.outage_ends = time.monotonic() + self.outage_seconds
            if time.monotonic() >= self.outage_ends:
                return False
            self.outage_answers += 1
            return True

    def model_gone(self, name: object) -> bool:
        """Whether a request naming model ``name`` meets the restarted server that lacks it."""
        with self.lock:
            gone = self.model_gone_after is not None and self.captioned >= self.model_gone_after
            return gone and bool(name)

    def note_captioned(self) -> None:
        with self.lock:
            self.captioned += 1

    def posts(self) -> list[dict[str, Any]]:
        """The JSON bodies of the POSTs so far, in order."""
        with self.lock:
            return [json.loads(r.body) for r in self.requests if r.method == "POST"]

    def post_times(self) -> list[float]:
        """When each POST so far arrived (``time.monotonic()``), in order."""
        with self.lock:
            return [r.at for r in self.requests if r.method == "POST"]

    def post_headers(self) -> list[dict[str, str]]:
        with self.lock:
            return [r.headers for r in self.requests if r.method == "POST"]

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler_for(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def proxy_outage(self) -> None:
            """HAProxy's own page when no server is up (503), or one broke the connection (502)."""
            status = 503 if stand_in.outage_answers % 2 else 502
            title = {502: "502 Bad Gateway", 503: "503 Service Unavailable"}[status]
            data = f"<html><body><h1>{title}</h1>\nNo server is available.\n</body></html>\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(data)

        def model_not_found(self, name: object) -> None:
            detail = (
                f"This server does not serve a model named {name!r}. Served: stand-in-model "
                "(default stand-in-model); omit the model to get the default."
            )
            self.reply(404, {"detail": detail})

        def do_GET(self) -> None:
            stand_in.record(Recorded("GET", self.path, dict(self.headers), b"", time.monotonic()))
            if stand_in.in_outage():
                self.proxy_outage()
                return
            query = parse_qs(urlsplit(self.path).query)
            if self.path.startswith("/prompts") and stand_in.model_gone(query.get("model", [""])[0]):
                self.model_not_found(query["model"][0])
                return
            if self.path.startswith("/prompts") and stand_in.prompts_delay:
                stand_in.release.wait(stand_in.prompts_delay)
            if self.path.startswith("/prompts") and stand_in.prompts_status == 503:
                self.reply(503, {"detail": "Queue full"}, {"Retry-After": "1"})
                return
            if self.path.startswith("/prompts") and stand_in.prompts_status:
                self.reply(stand_in.prompts_status, {"detail": "Internal error (request id abc123)"})
                return
            self.reply(200, "stand-in-model" if self.path == "/model" else PROMPTS)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            stand_in.record(Recorded("POST", self.path, dict(self.headers), body, time.monotonic()))
            if stand_in.in_outage():
                self.proxy_outage()
            elif stand_in.key and self.headers.get("Authorization") != f"Bearer {stand_in.key}":
                self.reply(401, {"detail": "Invalid API key"}, {"WWW-Authenticate": "Bearer"})
            elif stand_in.model_gone(model := json.loads(body or b"{}").get("model")):
                self.model_not_found(model)
            elif stand_in.take_busy():
                if stand_in.busy_status == 502:
                    self.reply(502, {"detail": "Bad gateway: the caption worker did not answer"})
                else:
                    hint = stand_in.busy_retry_after
                    hint = hint() if callable(hint) else hint
                    headers = {"Retry-After": hint} if hint is not None else None
                    self.reply(stand_in.busy_status, {"detail": "Queue full"}, headers)
            else:
                if stand_in.hang:
                    stand_in.release.wait(60)
                stand_in.note_captioned()
                self.reply(200, {"result": stand_in.caption})

    return Handler


def interrupt_in_flight(
    command: list[str], stand_in: StandIn, in_flight: int, env: dict[str, str], *, wait: float, grace: float
) -> tuple[int, str]:
    """Ctrl+C a folder client once ``in_flight`` of its requests hang on ``stand_in`` (started
    with ``hang=True``): run ``command`` with SIGINT at its default (a shell or .NET cannot take
    over a signal it was started with ignored, as under ``pytest &``), wait up to ``wait`` s for
    the requests, send SIGINT, and give it ``grace`` s to exit. Returns the exit status and
    stderr; a client still running at the end is killed."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + wait
        while len(stand_in.posts()) < in_flight and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(stand_in.posts()) == in_flight
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=grace)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr
