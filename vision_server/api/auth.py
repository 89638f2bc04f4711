"""Who may call: the API key on every route, the admin key (or loopback) on load and unload.

With ``--api-key`` (or ``--api-key-file``) every route needs ``Authorization: Bearer KEY``,
except the probes (``/health``, ``/ready``), ``/metrics`` unless ``--metrics-require-key``, and
CORS preflights (browsers send those without credentials); a path that is no route answers
404 (or 405) either way. A refusal is a 401 in the route
family's own error shape, with ``WWW-Authenticate: Bearer``, so every client library recognises it.

Loading and unloading evict the model for everyone, so they need the admin key; without one
configured they answer only to clients on this machine, and never to a request that came
through a reverse proxy (one on this host makes every remote client look local).
"""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from vision_server.api.access import route_name
from vision_server.api.errors import Handler, error_response
from vision_server.api.state import METRICS
from vision_server.errors import Forbidden, Unauthorized
from vision_server.settings import Settings, SettingsError
from vision_server.trusted_proxies import parse_address

# The web page and its files hold no data and must load before the user types the key; the page
# route still checks the key for non-browser requests (see vision_server.api.ui.page).
OPEN_ROUTES = frozenset({"ops.health", "ops.ready", "ui.page", "ui.static"})
METRICS_ROUTE = "ops.metrics"
REALM = 'Bearer realm="vision-server"'
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")  # what nginx, HAProxy, Caddy add


@dataclass(frozen=True)
class Keys:
    """The configured secrets, read once at start (the key file is not re-read per request)."""

    api: bytes | None = None
    admin: bytes | None = None
    metrics_open: bool = True


KEYS = web.AppKey("auth_keys", Keys)


def read_key_file(path: Path) -> str:
    """The first line of ``path``; an unreadable or empty file is a start-up error, never 'no key'."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"api_key_file {path}: {exc.strerror or exc}", setting="api_key_file") from None
    key = text.splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise SettingsError(
            f"api_key_file {path} is empty; put the key on its first line", setting="api_key_file"
        )
    return key


def keys_from(settings: Settings) -> Keys:
    api = settings.api_key or (read_key_file(settings.api_key_file) if settings.api_key_file else None)
    return Keys(
        api=api.encode() if api else None,
        admin=settings.admin_key.encode() if settings.admin_key else None,
        metrics_open=not settings.metrics_require_key,
    )


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_bytes(token: str) -> bytes:
    """The header's own bytes: aiohttp decodes headers as UTF-8 with ``surrogateescape``."""
    return token.encode("utf-8", "surrogateescape")


def key_matches(token: str | None, key: bytes | None) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    return token is not None and key is not None and hmac.compare_digest(token_bytes(token), key)


OTHER_KEY_HEADERS = ("X-API-Key", "Api-Key")  # where some tools put a key (Azure OpenAI: api-key)


def no_key(request: web.Request, what: str = "API key") -> str:
    """Why no bearer token was found, and the header that would carry one.

    A header that is there but not in the ``Bearer`` form (a bare key, ``Basic`` credentials,
    ``Bearer`` with nothing after it, a key in ``X-API-Key``) is named as such: "missing" alone
    sends the user looking for a key they already set.
    """
    send = f"send the header 'Authorization: Bearer <{what.lower()}>'"
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    if header and scheme.lower() == "bearer" and not rest.strip():
        return f"Missing {what}: the Authorization header says 'Bearer' but holds no key; {send}."
    if header and rest and scheme.isalpha():
        return f"Missing {what}: the Authorization header holds '{scheme}' credentials; {send}."
    if header:
        return f"Missing {what}: the Authorization header lacks the 'Bearer ' before the key; {send}."
    other = next((name for name in OTHER_KEY_HEADERS if name in request.headers), None)
    if other is not None:
        return f"Missing {what}: this server reads the key from Authorization, not {other}; {send}."
    return f"Missing {what}: {send}."


def wrong_key(token: str) -> str:
    """The refusal of a wrong key, naming the likely cause when the header is not even UTF-8."""
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        return "Invalid API key: the Authorization header holds bytes that are not UTF-8."
    return "Invalid API key."


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, what a
    dual-stack socket reports), read as :func:`~vision_server.trusted_proxies.parse_address`
    reads addresses; False for anything that is not an address."""
    parsed = parse_address(address) if address else None
    return parsed is not None and parsed.is_loopback


def needs_api_key(request: web.Request, keys: Keys) -> bool:
    """A path that matches no route (or not with this method) needs no key: it answers 404 or 405,
    with the hint for a mistyped base URL, rather than a 401 that sends the user looking at the key
    (which paths exist is no secret: the routes are documented)."""
    if keys.api is None or request.method == "OPTIONS" or request.match_info.http_exception is not None:
        return False
    route = route_name(request)
    return route not in OPEN_ROUTES and not (route == METRICS_ROUTE and keys.metrics_open)


def check_api_key(request: web.Request, *, even_on_open_routes: bool = False) -> None:
    """Raise :class:`Unauthorized` unless the request carries the API key (or the admin key)."""
    keys = request.app[KEYS]
    if keys.api is None or not (even_on_open_routes or needs_api_key(request, keys)):
        return
    token = bearer_token(request)
    if key_matches(token, keys.api) or key_matches(token, keys.admin):
        return
    if token is None:
        raise Unauthorized(no_key(request))
    raise Unauthorized(wrong_key(token))


def check_admin(request: web.Request) -> None:
    """The admin key when one is configured; otherwise only loopback clients."""
    keys = request.app[KEYS]
    if keys.admin is None:
        proxied = [name for name in PROXY_HEADERS if name in request.headers]
        if proxied:
            raise Forbidden(
                f"This request came through a proxy (it carries {proxied[0]}), so its loopback "
                "address proves nothing; start the server with --admin-key to load and unload "
                "the model through a proxy."
            )
        if is_loopback(request.remote):
            return
        raise Forbidden(
            "Loading and unloading the model is allowed only from this machine; "
            "start the server with --admin-key to allow it from elsewhere."
        )
    token = bearer_token(request)
    if key_matches(token, keys.admin):
        return
    if token is None:
        raise Unauthorized(no_key(request, "admin key"))
    raise Forbidden("This key may not load or unload the model; use the admin key.")


def admin_only(handler: Handler) -> Handler:
    """Wrap a route handler so it runs only for admins (see :func:`check_admin`)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        check_admin(request)
        return await handler(request)

    return guarded


def challenge(request: web.Request) -> str:
    """RFC 6750: name the error only when a token was sent and was wrong."""
    return REALM if bearer_token(request) is None else REALM + ', error="invalid_token"'


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        check_api_key(request)
        return await handler(request)
    except Unauthorized as exc:
        request.app[METRICS].request_rejected("unauthorized")
        response = error_response(request, exc)
        response.headers["WWW-Authenticate"] = challenge(request)
        return response
    except Forbidden:
        request.app[METRICS].request_rejected("forbidden")
        raise
