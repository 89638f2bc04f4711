"""An asyncio client for the native vision-server API (the florence2-visionapi wire format).

One :class:`AsyncVisionClient` holds one aiohttp session, so a folder run's parallel requests
reuse a small pool of keep-alive connections. It retries what is worth retrying (see
:mod:`vision_server.client.retry`) and turns every other failure into a
:class:`~vision_server.client.errors.VisionClientError` that carries the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError

from vision_server import __version__
from vision_server.client.errors import (
    EmptyImageFile,
    MalformedReply,
    RequestRejected,
    VisionAddressError,
    VisionClientError,
    VisionConnectionError,
    VisionHTTPError,
    VisionTimeoutError,
    VisionTLSError,
    http_error,
)
from vision_server.client.retry import (
    DEFAULT_RETRIES,
    GATEWAY_OUTAGE_STATUSES,
    MAX_OUTAGES_PER_REQUEST,
    NOT_BACK_STATUSES,
    RETRY_STATUSES,
    RetryPolicy,
    ServerWait,
    is_gateway_outage,
    parse_retry_after,
)

DEFAULT_URL = "http://127.0.0.1:54880"
DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"
DEFAULT_TIMEOUT = 600.0  # the server's own request deadline; a long queue is normal in a folder run
MODEL_HEADER = "X-Model"  # names the model that captioned (vision_server.api.served_model sets it)
# Any HTTP answer here but 502/503/504 means the server is back (a 404 from servers without it
# too); a proxy answers 503 here while no server behind it is up.
PROBE_PATH = "/health"
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)

ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str]


@dataclass(frozen=True)
class CaptionResult:
    """A caption and the served model that made it.

    ``model`` is the server's name for it (``vision-server serve --model NAME=...``; the source,
    such as a hub id, for an unnamed model), or None from a server that does not say (the
    original florence2-visionapi).
    """

    text: str
    model: str | None


def task_token(task: str) -> str:
    """Accept ``caption``, ``CAPTION`` or ``<CAPTION>``; the wire format wants the bracketed token."""
    token = task.strip().upper()
    if not token.startswith("<"):
        token = f"<{token}>"
    return token


def normalize_base_url(url: str) -> str:
    """Allow ``host:port`` and a trailing slash, as people type them into ``VISION_HOST``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url


def encode_image(image: ImageInput) -> str:
    """Base64 of raw image bytes, or of the file at a path (a ``str`` is always a path).

    Nothing is empty on the wire: an empty file is refused here, in words about the file (the
    server could only say that the image string it got is empty)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = image
        if len(data) == 0:
            raise VisionClientError("the image is empty (0 bytes)")
    else:
        data = Path(image).read_bytes()
        if not data:
            raise EmptyImageFile(image)
    return base64.b64encode(data).decode("ascii")


def error_detail(body: str, fallback: str) -> str:
    """The human message from an error body: native ``detail``, OpenAI ``error.message``, or text."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to decode: read as text
        if body.lstrip().startswith("<"):  # a proxy's HTML error page: its words, not its markup
            body = " ".join(re.sub(r"<[^>]*>", " ", body).split())
        return body.strip()[:500] or fallback
    if isinstance(data, dict):
        detail = data.get("detail")
        if detail is None and isinstance(data.get("error"), dict):
            detail = data["error"].get("message")
        if isinstance(detail, list):  # FastAPI-style validation errors
            detail = "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
            )
        if detail:
            return str(detail)
    return body.strip()[:500] or fallback


class AsyncVisionClient:
    """Caption images with a vision-server; use ``async with`` or call :meth:`close`.

    ``retries`` covers busy answers (429/502/503, honouring ``Retry-After``) and lost
    connections. ``wait_for_server`` (seconds, default 0: off) is for long runs: a server that
    cannot be reached (not started yet, or a restart mid-run) pauses every request of this
    client until ``GET /health`` gets an answer again, up to that many seconds, and then sends
    the interrupted requests again; only after that window do they fail with
    :class:`VisionConnectionError`. Behind a proxy an outage reads as the proxy's own 502/503
    (no ``Retry-After``, no JSON): once ``retries`` are used up on those, the request waits the
    same way, until ``/health`` answers other than 502/503/504. A host name that does not
    resolve (:class:`VisionAddressError`) and TLS trouble (:class:`VisionTLSError`) are never
    waited for. ``on_server_wait`` gets the lines "server unreachable; waiting up to N s ..."
    and "server back; going on" (default: a warning on the ``vision_server.client`` logger).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        *,
        connect_timeout: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        client_id: str | None = None,
        model: str | None = None,
        wait_for_server: float = 0.0,
        on_server_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        # The served model to caption with (a server with several models): None is its default.
        self.model_name = model or None
        self.policy = retry_policy or RetryPolicy(retries=retries)
        self._headers = {"User-Agent": f"vision-client/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if client_id:  # bulk work from one address takes turns by this name on the server
            self._headers["X-Client-Id"] = client_id
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        # Long runs outlive a server restart: once the server has answered, losing it pauses every
        # request for up to ``wait_for_server`` seconds instead of failing them after ``retries``.
        self._reached = False
        self._server_wait = (
            ServerWait(wait_for_server, self._server_answers, on_server_wait) if wait_for_server > 0 else None
        )

    async def __aenter__(self) -> AsyncVisionClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool; the client can still be used again afterwards."""
        if self._server_wait is not None:
            self._server_wait.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def caption(
        self, image: ImageInput, task: str = DEFAULT_TASK, *, priority: str | None = None
    ) -> str:
        """Caption one image (bytes or a file path) with a task such as ``CAPTION`` or ``<ANALYZE>``.

        ``priority`` ``"bulk"`` lets a person's single requests go ahead of this one (folder runs
        use it); the server's default is ``"interactive"``.
        """
        return (await self.caption_result(image, task, priority=priority)).text

    async def caption_result(
        self, image: ImageInput, task: str = DEFAULT_TASK, *, priority: str | None = None
    ) -> CaptionResult:
        """As :meth:`caption`, with the name of the served model that answered."""
        encoded = await asyncio.to_thread(encode_image, image)
        body = {"image": encoded, "prompt": task_token(task)}
        if priority is not None:
            body["priority"] = priority
        if self.model_name is not None:
            body["model"] = self.model_name
        data, headers = await self._exchange("POST", "/process_image", body)
        if not isinstance(data, dict) or not isinstance(data.get("result"), str):
            raise MalformedReply(f"unexpected reply from {self.base_url}/process_image: {data!r:.200}")
        model = headers.get(MODEL_HEADER)
        return CaptionResult(data["result"].strip(), unquote(model) if model else None)

    async def prompts(self, *, timeout: float | None = None) -> list[str]:
        """The task tokens the model understands (the client's ``model``, else the default).

        ``timeout`` caps each try in seconds (never above the client's own timeout)."""
        query = "" if self.model_name is None else "?" + urlencode({"model": self.model_name})
        return list(await self._request("GET", "/prompts" + query, timeout=timeout))

    async def served_name(self, *, timeout: float | None = None) -> str | None:
        """The served name the client's ``model`` means on this server (None without one).

        A server answers a model's source (hub id, folder) as the model it serves under another
        name, and marks its captions with that name (``X-Model``); a folder run resumes from
        rows of either spelling. A server without ``/v1/models`` (florence2-visionapi) leaves
        the name as given; an unknown name is a 404 from ``/prompts?model=``, asked first.
        ``timeout`` caps each try, as for :meth:`prompts`.
        """
        if self.model_name is None:
            return None
        await self.prompts(timeout=timeout)  # a 404 here: no such model (or no vision-server here)
        try:
            path = "/v1/models/" + quote(self.model_name, safe="")
            data = await self._request("GET", path, timeout=timeout)
        except RequestRejected:
            return self.model_name
        served = data.get("id") if isinstance(data, dict) else None
        return served if isinstance(served, str) and served else self.model_name

    async def model(self) -> str:
        """The model the server is configured with."""
        return str(await self._request("GET", "/model"))

    async def status(self) -> dict[str, Any]:
        """Model state, queue depth and the rest of ``/v1/status``."""
        return dict(await self._request("GET", "/v1/status"))

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def _request(
        self, method: str, path: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request, retrying busy answers and lost connections; return the decoded JSON.
        ``timeout`` caps each try in seconds, below the client's own timeout."""
        return (await self._exchange(method, path, payload, timeout=timeout))[0]

    async def _exchange(
        self, method: str, path: str, payload: Any = None, *, timeout: float | None = None
    ) -> tuple[Any, Mapping[str, str]]:
        """As :meth:`_request`, with the reply's headers."""
        url = self.base_url + path
        attempt = 0
        outages = 0
        while True:
            try:
                return await self._attempt(method, url, payload, timeout)
            except (VisionTLSError, VisionAddressError):
                raise  # the same certificate, port or host name answers the same way on every try
            except VisionConnectionError as error:
                if self._server_wait is not None:
                    # The request may have been lost with the connection; sending it again is safe
                    # (captions are only stored from answers), so wait with the others, then resend.
                    if outages >= MAX_OUTAGES_PER_REQUEST:
                        raise VisionClientError(
                            f"the connection to {self.base_url} broke {outages + 1} times around this "
                            f"request (does the server crash on it?): {error}"
                        ) from error
                    outages += 1
                    if await self._server_wait.wait(self._outage("server unreachable")):
                        continue
                    raise VisionConnectionError(
                        f"{error} (waited {self._server_wait.window:g} s for the server to come back)"
                    ) from error
                if attempt >= self.policy.retries:
                    raise
                retry_after = None
            except VisionHTTPError as error:
                if not _retryable(error):
                    raise
                if attempt >= self.policy.retries:
                    if not (error.gateway_outage and self._server_wait is not None):
                        raise
                    await self._wait_behind_proxy(error, outages)
                    outages += 1
                    attempt = 0  # the server is back: this request gets its retries again
                    continue
                retry_after = error.retry_after
            await asyncio.sleep(self.policy.delay(attempt, retry_after))
            attempt += 1

    async def _wait_behind_proxy(self, error: VisionHTTPError, outages: int) -> None:
        """A proxy kept answering that no server behind it does: wait with the others for one
        to come back (returns), or raise what stops the run."""
        assert self._server_wait is not None
        if outages >= MAX_OUTAGES_PER_REQUEST:
            raise VisionClientError(
                f"the server behind {self.base_url} went away {outages + 1} times around this "
                f"request (does it crash on it?): {error}"
            ) from error
        if not await self._server_wait.wait(
            self._outage(f"no server behind the proxy answers (HTTP {error.status})")
        ):
            raise VisionConnectionError(
                f"{error} (no server behind the proxy at {self.base_url} came back within "
                f"{self._server_wait.window:g} s)"
            ) from error

    def _outage(self, what: str) -> str:
        """How a wait starts: "not up yet" before the server ever answered (it may be starting,
        or the URL may be wrong: the line names it), else a server that went away."""
        return what if self._reached else f"{what} at {self.base_url} (not up yet?)"

    async def _server_answers(self) -> bool:
        """Whether the server is back (the probe of a :class:`ServerWait`): any HTTP answer
        but a proxy's 502/503/504 (or ours while the worker restarts)."""
        try:
            async with self._get_session().get(self.base_url + PROBE_PATH, timeout=PROBE_TIMEOUT) as resp:
                await resp.read()
                return resp.status not in NOT_BACK_STATUSES
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _attempt(
        self, method: str, url: str, payload: Any, timeout: float | None = None
    ) -> tuple[Any, Mapping[str, str]]:
        """One try: the decoded JSON body and the headers, or an exception saying what went wrong."""
        limit = self._try_limit(timeout)
        try:
            async with self._get_session().request(method, url, json=payload, timeout=limit) as resp:
                body, headers = await self._read_answer(resp)
        except aiohttp.ConnectionTimeoutError as exc:
            raise VisionConnectionError(f"cannot connect to {self.base_url}: {exc}") from exc
        except aiohttp.ClientSSLError as exc:
            raise VisionTLSError(tls_failure(self.base_url, exc)) from exc
        except aiohttp.ClientConnectorDNSError as exc:
            host = urlsplit(self.base_url).hostname
            raise VisionAddressError(
                f"cannot reach {self.base_url}: the host name {host!r} does not resolve"
            ) from exc
        except asyncio.TimeoutError:
            raise VisionTimeoutError(f"no answer from {url} within {limit.total} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            if isinstance(exc.__cause__, ContentEncodingError):  # all there, but no decoder takes it
                raise MalformedReply(unreadable_reply(url, exc.__cause__)) from exc
            raise await self._lost_connection(exc) from exc
        except aiohttp.ClientResponseError as exc:  # an answer, but none that HTTP allows
            raise MalformedReply(unreadable_reply(url, exc)) from exc
        try:
            return json.loads(body), headers
        except RecursionError:  # json.loads' own depth limit: no ValueError
            raise MalformedReply(f"{url} answered with JSON nested too deep to read") from None
        except ValueError:
            raise MalformedReply(f"{url} did not answer with JSON: {body[:200]!r}") from None

    def _try_limit(self, timeout: float | None) -> aiohttp.ClientTimeout:
        """The client's time limit for one try, or ``timeout`` where that is shorter."""
        limit = self._timeout
        if timeout is not None and (limit.total is None or timeout < limit.total):
            limit = aiohttp.ClientTimeout(
                total=timeout, sock_connect=min(timeout, limit.sock_connect or timeout)
            )
        return limit

    async def _read_answer(self, resp: aiohttp.ClientResponse) -> tuple[str, Mapping[str, str]]:
        """The body and headers of an answer; an error status raised as the
        :class:`VisionHTTPError` it is, marked when it is a proxy's "no server behind me". Any
        answer but such a proxy's shows the server was reached (which later outages are told by)."""
        if resp.status not in GATEWAY_OUTAGE_STATUSES:
            self._reached = True
        body = await resp.text(errors="replace")
        if resp.status >= 400:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            outage = is_gateway_outage(resp.status, retry_after, body)
            if not outage:  # the server's own answer: it is there
                self._reached = True
            detail = error_detail(body, resp.reason or "error")
            raise http_error(resp.status, detail, retry_after, gateway_outage=outage)
        return body, resp.headers

    async def _lost_connection(
        self, exc: aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
    ) -> VisionConnectionError:
        """What a connection that failed or broke means, in words that say what to check: a
        refused connection, plain HTTP to an HTTPS port (never mended by waiting), or else
        aiohttp's own message."""
        hint = ""
        # What plain HTTP to an HTTPS port looks like: the TLS server hangs up unanswered.
        disconnected = isinstance(exc, aiohttp.ServerDisconnectedError) and not self._reached
        if disconnected and self.base_url.startswith("http://"):
            if await speaks_tls(self.base_url):  # a wrong scheme: waiting would never mend it
                https = "https://" + self.base_url.removeprefix("http://")
                return VisionTLSError(
                    f"{self.base_url} hung up without an answer, and that port speaks HTTPS: use {https}"
                )
            hint = "; if the server speaks HTTPS (--ssl-cert, or TLS at a proxy), use https://"
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError):
            # aiohttp's "Cannot connect to host ... ssl:default [Connect call failed ...]" says less
            return VisionConnectionError(
                f"cannot reach {self.base_url}: connection refused (is vision-server running there? "
                "check the port, --url or VISION_HOST)"
            )
        return VisionConnectionError(f"cannot reach {self.base_url}: {one_line_message(str(exc))}{hint}")


async def speaks_tls(base_url: str, timeout: float = 5.0) -> bool:
    """Whether ``base_url``'s host and port complete a TLS handshake (the certificate unchecked:
    this only asks which protocol the port speaks, and nothing is sent over it)."""
    parts = urlsplit(base_url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 80, ssl=context), timeout
        )
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout)
    return True


def unreadable_reply(url: str, exc: aiohttp.ClientResponseError | ContentEncodingError) -> str:
    """What was wrong with an answer aiohttp could not take as HTTP (a broken proxy's status line
    such as ``HTTP/1.1 abc``, a header it refuses, a gzip body that is not gzip), or with a
    redirect that never ends. Its ``status`` is aiohttp's own 400, not the server's, so it is
    not shown as one."""
    if isinstance(exc, aiohttp.TooManyRedirects):
        return f"{url} kept redirecting ({len(exc.history)} redirects); check --url (or the proxy)"
    detail = one_line_message(exc.message) or type(exc).__name__
    return f"{url} answered with something that is not valid HTTP ({detail})"


def unforeseen_failure(exc: BaseException) -> str:
    """An exception no check knows, as a stopped run names it on one line: ``Type: message``
    (just ``Type`` when it says nothing)."""
    words = one_line_message(str(exc))
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


def one_line_message(text: str, limit: int = 300) -> str:
    """aiohttp's parser messages on one line: they span several (the offending bytes, then a
    line with a caret under the fault), and an error message of this client is one line."""
    lines = (line.strip() for line in text.splitlines())
    words = " ".join(line for line in lines if line.strip("^ "))
    return words if len(words) <= limit else words[: limit - 3] + "..."


def tls_failure(base_url: str, exc: aiohttp.ClientSSLError) -> str:
    """Say why the handshake failed and what fixes it: trust the certificate, or drop https."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"the TLS certificate of {base_url} is not trusted ({exc.certificate_error}); for a "
            "self-signed certificate or a private CA, point SSL_CERT_FILE at that certificate "
            "(export SSL_CERT_FILE=/path/to/ca.pem)"
        )
    return (
        f"the TLS handshake with {base_url} failed ({exc.os_error}); does the server speak HTTPS "
        "on that port? A server started without --ssl-cert needs an http:// URL"
    )


def _retryable(error: VisionHTTPError) -> bool:
    """ "Busy, come back later" answers are worth another try (lost connections are too)."""
    return error.status in RETRY_STATUSES
