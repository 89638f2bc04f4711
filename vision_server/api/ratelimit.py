"""Optional per-client rate limit: a token bucket per client address, in memory, bounded in size.

Off by default. The client is ``request.remote``: behind a reverse proxy that is the proxy's
address, shared by all its clients, unless the proxy is named with ``--trusted-proxy``; then it is
the client the proxy names in ``X-Forwarded-For`` (:mod:`vision_server.api.proxies`), so each
client gets its own bucket. An IPv6 client is counted by its /64 network (:func:`bucket_of`):
one host or home line is handed a whole /64 and may send from any address in it, so counting
single addresses let it take a fresh bucket per request, and push everyone else's buckets out.
Limiting at the proxy (HAProxy's ``http-request deny`` with a stick table) works too, and spares
the daemons the refused requests.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from vision_server.api.access import PROBE_ROUTES, route_name
from vision_server.api.errors import Handler
from vision_server.api.state import METRICS
from vision_server.errors import RateLimited
from vision_server.trusted_proxies import parse_address

MAX_CLIENTS = 10_000
IPV6_PREFIX = 64  # what one subscriber or host is given (RFC 6177), so what one client controls


def bucket_of(client: str | None) -> str:
    """The bucket a client address counts against: IPv4 addresses one each, IPv6 by /64."""
    if not client:
        return "-"
    address = parse_address(client)  # an IPv4-mapped address is the IPv4 client it is
    if address is None:
        return client  # not an address (a Unix socket peer): itself
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class RateLimiter:
    """``per_minute`` requests a minute per client, in bursts of up to ``burst`` (default: a minute's worth).

    The least recently seen client is forgotten when ``max_clients`` are tracked, so memory stays
    bounded however many addresses call; a forgotten client simply starts with a full bucket.
    """

    def __init__(
        self,
        per_minute: float,
        *,
        burst: float | None = None,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = burst if burst is not None else max(1.0, per_minute)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, updated

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when allowed, else the seconds until a token is due."""
        now = self.clock()
        tokens, updated = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 with ``Retry-After`` over the limit. Probes and CORS preflights are never limited."""
    if request.method == "OPTIONS" or route_name(request) in PROBE_ROUTES:
        return await handler(request)
    limiter = request.app[RATE_LIMITER]
    wait = limiter.acquire(bucket_of(request.remote))
    if wait > 0:
        request.app[METRICS].request_rejected("rate_limited")
        seconds = math.ceil(wait)
        raise RateLimited(
            f"Too many requests: the limit is {limiter.per_minute:g} a minute per client; "
            f"retry in {seconds} s.",
            retry_after=seconds,
        )
    return await handler(request)
