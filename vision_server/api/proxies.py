"""Behind trusted proxies, ``request.remote`` is the client the proxy names, not the proxy.

With ``--trusted-proxy`` this is the outermost middleware: a request whose peer is a trusted proxy
continues as a clone whose ``remote`` is the client from ``X-Forwarded-For``
(:meth:`vision_server.trusted_proxies.TrustedProxies.client`), so the access log, the rate limit
and the bulk lane's turns by host all see the same, real client through ``request.remote`` alone.
The proxy's own address stays in ``request[PEER]`` for the log. A request from any other peer is
left exactly as it came: its forwarding headers are ignored, never an error, since a client may
send them on its own. ``Forwarded`` (RFC 7239) is not read; HAProxy's ``option forwardfor``,
nginx and Caddy all send ``X-Forwarded-For``.

Admin routes without an admin key are unaffected: they refuse any request that carries a
forwarding header (:func:`vision_server.api.auth.check_admin`), whatever the client is resolved to.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from vision_server.api.errors import Handler
from vision_server.trusted_proxies import TrustedProxies

TRUSTED_PROXIES = web.AppKey("trusted_proxies", TrustedProxies)
PEER = web.RequestKey("proxy_peer", str)  # the trusted proxy a forwarded request came through


@web.middleware
async def forwarded_client_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    values = request.headers.getall(hdrs.X_FORWARDED_FOR, ())
    if not values:
        return await handler(request)
    peer = request.remote
    client = request.app[TRUSTED_PROXIES].client(peer, values)
    if client is None or peer is None:
        return await handler(request)
    forwarded = request.clone(remote=client)
    forwarded[PEER] = peer
    return await handler(forwarded)
