"""What can go wrong when talking to a vision server, as exceptions a caller can catch by kind.

Every error is a :class:`VisionClientError`, so scripts can catch one class. Errors the server
answered with carry its status code and its own ``detail`` message, because that message is the
one that tells the user what to fix ("Invalid image data: ...", the list of valid tasks).
"""

from __future__ import annotations


class VisionClientError(Exception):
    """Base of every error raised by the client."""


# How every folder captioner (vision-client folder, the folder scripts, vision-server caption)
# reports an image file of 0 bytes.
EMPTY_FILE = "the file is empty (0 bytes)"


class EmptyImageFile(VisionClientError):
    """An image file of 0 bytes: refused before sending, in the words every dataset tool uses
    (``EMPTY_FILE``; the folder summaries name the file before it)."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{EMPTY_FILE}: {path}")


class VisionConnectionError(VisionClientError):
    """The server could not be reached, even after retrying."""


class VisionTLSError(VisionConnectionError):
    """The TLS handshake failed (an untrusted certificate, or no HTTPS on that port), or an
    ``http://`` URL names a port that speaks HTTPS.

    Unlike a refused or lost connection this does not go away by itself, so it is never retried.
    """


class VisionAddressError(VisionConnectionError):
    """The server's host name does not resolve: a wrong ``--url`` more often than an outage, so it
    is never waited for (the other connection failures are, with ``wait_for_server``)."""


class VisionTimeoutError(VisionClientError):
    """The server did not answer within the client's timeout."""


class MalformedReply(VisionClientError):
    """The answer could not be read: not valid HTTP (a broken proxy's status line, a header the
    parser refuses), not JSON, or JSON nested deeper than Python decodes.

    Unlike a lost connection it is not retried or waited for: something at that address
    answered, and would most likely answer the same way again (as a 4xx would). A folder run
    fails that image and goes on.
    """


class VisionHTTPError(VisionClientError):
    """The server answered with an error status; ``detail`` is its explanation."""

    def __init__(
        self, status: int, detail: str, *, retry_after: float | None = None, gateway_outage: bool = False
    ) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        # A proxy in front answered that no server behind it does (502/503 of its own, see
        # retry.is_gateway_outage): a restart or a pool that is down, not a busy server.
        self.gateway_outage = gateway_outage


class RequestRejected(VisionHTTPError):
    """A 4xx answer: the request itself is wrong and sending it again will not help."""


class AuthenticationError(RequestRejected):
    """401/403: the API key is missing or wrong.

    A 401's message also says where the key goes: the server's own words ("send the header
    'Authorization: Bearer <api key>'") leave a user of the command line guessing.
    """

    def __init__(
        self, status: int, detail: str, *, retry_after: float | None = None, gateway_outage: bool = False
    ) -> None:
        super().__init__(status, detail, retry_after=retry_after, gateway_outage=gateway_outage)
        if status == 401:
            self.args = (f"{self.args[0]} {KEY_HINT}",)


KEY_HINT = "(give the key as api_key; vision-client: --api-key or VISION_API_KEY)"


class ServerBusy(VisionHTTPError):
    """429/502/503 that persisted through every retry (queue full, model failed to load, a 502
    the server or a gateway says itself); a proxy's bare 502/503 has ``gateway_outage`` set."""


class ServerError(VisionHTTPError):
    """A 5xx answer other than "busy": the server failed or the request ran past its deadline."""


def http_error(
    status: int, detail: str, retry_after: float | None = None, *, gateway_outage: bool = False
) -> VisionHTTPError:
    """Pick the exception class that matches an error status."""
    if status in (401, 403):
        cls: type[VisionHTTPError] = AuthenticationError
    elif status in (429, 502, 503):  # the statuses retried as "not now" (retry.RETRY_STATUSES)
        cls = ServerBusy
    elif 400 <= status < 500:
        cls = RequestRejected
    else:
        cls = ServerError
    return cls(status, detail, retry_after=retry_after, gateway_outage=gateway_outage)
