"""When to try a request again and how long to wait first.

A busy server says how long to wait (``Retry-After`` on 503/429); we wait at least that long,
plus a little jitter so a folder run's parallel requests do not all come back in the same
instant. Without a hint we back off exponentially with jitter. Only answers that mean "not now"
are retried: a 4xx will fail the same way again, and a 504 already used up the server's deadline.

A server that cannot be reached at all is a different case for long runs: :class:`ServerWait`
holds every request of a client until it answers again (a restart), up to a time window. Behind
a proxy (HAProxy, nginx) the same restart looks different: the proxy answers 502 or 503 itself,
quickly and without ``Retry-After`` (:func:`is_gateway_outage`), so those answers lead to the same
wait once ``retries`` are used up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({429, 502, 503})
# What a proxy answers when no server behind it does: 503 "no server available" (every backend
# down, or its queue timed out), 502 (a backend broke the connection: it crashed or restarted).
# Not 504: that is a deadline a server that took the request ran past; sending it again could
# take as long again, so it keeps failing the image.
GATEWAY_OUTAGE_STATUSES = frozenset({502, 503})
# Probe answers that do not mean "back": the proxy still has no server, or ours is not up yet.
NOT_BACK_STATUSES = frozenset({502, 503, 504})

log = logging.getLogger("vision_server.client")


# The retry schedule every client shares (vision-client, the Python API, the bash and PowerShell
# scripts; docs/clients/index.md#retries): keep clients/vision-client.sh (``RETRY_*``) and
# clients/VisionClient.Common.ps1 (``Get-VisionRetryDelay``) in step with these.
DEFAULT_RETRIES = 5  # attempts after the first one, in every client and folder tool
BASE_DELAY = 0.5  # seconds before the first retry when the server gives no hint; doubles each time
MAX_DELAY = 30.0  # cap for that back-off
# A server's Retry-After is honoured up to this; vision-server's own never says more (its
# scheduler caps the estimate at the same 120 s).
MAX_RETRY_AFTER = 120.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and how the wait grows between attempts."""

    retries: int = DEFAULT_RETRIES
    base_delay: float = BASE_DELAY
    max_delay: float = MAX_DELAY
    max_retry_after: float = MAX_RETRY_AFTER

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0 for the first retry): the server's
        ``Retry-After`` (capped) plus up to a tenth more, else the back-off for this attempt
        somewhere between half of it and all of it (so parallel requests spread out)."""
        if retry_after is not None:
            wait = min(retry_after, self.max_retry_after)
            return wait + random.uniform(0, 0.1 * wait + 0.05)
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(backoff / 2, backoff)


# Retry-After in seconds as every client reads it: RFC 9110's delay-seconds (ASCII digits), also
# with a fraction or a sign (0 or less: at once). Not ``float()``'s wider grammar: "1e3", "inf"
# or "1_000" are no hint (the bash and PowerShell clients cannot read them either).
_SECONDS = re.compile(r"[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)", re.ASCII)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header, in seconds or as an HTTP date; ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return max(0.0, float(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def is_gateway_outage(status: int, retry_after: float | None, body: str) -> bool:
    """Whether an error answer is a proxy's "no server behind me", not the server's own word.

    A vision server's own 503 (queue full, draining, a model that failed to load) carries
    ``Retry-After`` and a JSON body, and its other errors a JSON body too; HAProxy's and nginx's
    502/503 pages are HTML (or empty) with no ``Retry-After``.
    """
    return status in GATEWAY_OUTAGE_STATUSES and retry_after is None and not body.lstrip().startswith("{")


PROBE_DELAY_CAP = 5.0  # a server that is back is noticed within this many seconds
MAX_OUTAGES_PER_REQUEST = 5  # a request that broke the connection this often fails (a poison image)


class ServerWait:
    """Pauses every request of one client together while its server cannot be reached.

    A restart (systemd ``Restart=``, a deploy, ``systemctl restart``) refuses connections for a
    few seconds and breaks the ones in flight. Instead of each request burning its own retries,
    the first one to notice starts one probe loop; the others wait on it, and all of them go on
    (sending their request again) as soon as the probe says the server is back, or give up
    together once ``window`` seconds have passed. ``notify`` gets one line when the wait starts
    and one when it ends; a blip that the first probe already gets past is not reported.
    """

    def __init__(
        self,
        window: float,
        probe: Callable[[], Awaitable[bool]],
        notify: Callable[[str], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._probe = probe
        self._notify = notify
        self._clock = clock
        self._task: asyncio.Task[bool] | None = None

    async def wait(self, what: str = "server unreachable") -> bool:
        """Wait until the server answers again: True when it does, False when the window ran out.

        ``what`` names the outage in the first line (the request that starts the wait says it).
        """
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._until_back(what))
        return await asyncio.shield(self._task)

    def cancel(self) -> None:
        """Stop a probe loop nobody waits for any more (the client is closing)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _until_back(self, what: str) -> bool:
        if await self._probe():  # a reset keep-alive connection, not an outage: go on quietly
            return True
        deadline = self._clock() + self.window
        self._say(f"{what}; waiting up to {self.window:g} s for it to come back")
        attempt = 0
        while True:
            left = deadline - self._clock()
            if left <= 0:
                self._say(f"server still not back after {self.window:g} s; giving up")
                return False
            await asyncio.sleep(min(left, PROBE_DELAY_CAP, 0.5 * 2**attempt))
            attempt += 1
            if await self._probe():
                self._say("server back; going on")
                return True

    def _say(self, message: str) -> None:
        if self._notify is not None:
            self._notify(message)
        else:
            log.warning("%s", message)
