"""Refuse the requests a web page on another site makes a visitor's browser send (CSRF).

Any page a user opens may ``fetch()`` a POST to ``http://127.0.0.1:54880`` with a ``text/plain``
or form body: such a "simple" request needs no CORS preflight, so the browser sends it and only
hides the reply from the page. Without an API key (the loopback default) that page could unload
the model (admin routes trust loopback, and the browser is on loopback), caption at will, or
overwrite a writable gallery's caption files. An API key stops it (a page cannot make the browser
add ``Authorization``), but a key is optional on loopback.

Browsers say where a request comes from in ``Sec-Fetch-Site`` (every current one: Chrome 76,
Firefox 90, Safari 16.4). A POST marked ``cross-site`` or ``same-site`` (another port of the same
host counts as same-site) is refused with a 403 unless its ``Origin`` is one ``--cors-origin``
allows: those pages are the operator's, and SillyTavern's Extras mode is one. The server's own
web page is ``same-origin`` and passes; so do links, bookmarks and typed addresses (GETs), and
every non-browser client (curl, Python, ComfyUI, SillyTavern's server), which sends no such header.
"""

from __future__ import annotations

from aiohttp import web

from vision_server.api.cors import allowed_origin
from vision_server.api.errors import Handler
from vision_server.api.state import METRICS, SETTINGS
from vision_server.errors import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # reads: a page cannot see their replies
OTHER_SITES = frozenset({"cross-site", "same-site"})


def from_another_site(request: web.Request) -> bool:
    """Whether a browser sent this unsafe request for a page of another site that CORS does not allow."""
    if request.method in SAFE_METHODS:
        return False
    if request.headers.get("Sec-Fetch-Site", "").strip().lower() not in OTHER_SITES:
        return False
    return allowed_origin(request.headers.get("Origin"), request.app[SETTINGS].cors_origins) is None


@web.middleware
async def cross_site_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if from_another_site(request):
        request.app[METRICS].request_rejected("forbidden")
        origin = request.headers.get("Origin") or "an unnamed origin"
        raise Forbidden(
            f"Refused a request a web page on another site ({origin}) made the browser send. "
            "To let that page call this server, start it with --cors-origin naming its origin."
        )
    return await handler(request)
