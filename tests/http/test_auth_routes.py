"""Every registered route under ``--api-key`` and ``--admin-key``, with no key, a wrong key, the
API key and the admin key.

The routes come from the served application's own router, so a route added later is checked
without touching this file. What is expected (the README's Operations section, ``vision_server.api.auth``):

- ``/health``, ``/ready`` and the web page's files never need a key; ``/metrics`` is open unless
  ``--metrics-require-key``;
- every other route: no key or a wrong key → 401 with ``WWW-Authenticate: Bearer`` in the route
  family's error shape; the API key or the admin key → anything but 401;
- admin routes (load/unload): the API key → 403, the admin key → 200.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.web_urldispatcher import AbstractRoute

from tests.support.api import tiny_settings
from vision_server.api.auth import admin_only
from vision_server.api.state import ENGINE
from vision_server.app import create_app
from vision_server.settings import Settings

API_KEY = "api-key-for-route-tests"
ADMIN_KEY = "admin-key-for-route-tests"
OPEN_PATHS = {"/health", "/ready"}
# The web page's files: open (the page must load to ask for the key); the name filled in here is
# not a file, so they answer 404, never 401.
OPEN_FILE_ROUTES = {"ui.static"}
METRICS_PATH = "/metrics"
_ADMIN_CODE = admin_only(lambda request: None).__code__  # type: ignore[arg-type,return-value]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str  # dynamic parts filled in
    name: str

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def is_admin(route: AbstractRoute) -> bool:
    """Admin handlers are the wrappers made by ``admin_only`` (all share its code object)."""
    return getattr(route.handler, "__code__", None) is _ADMIN_CODE


def routes_of(app: web.Application, model_id: str) -> tuple[list[Route], set[str]]:
    """All (method, path) pairs the app serves, and the paths of its admin routes."""
    routes, admin = [], set()
    for route in app.router.routes():
        if route.method == "*" or route.resource is None:
            continue
        path = re.sub(r"\{[^}]+\}", model_id, route.resource.canonical)
        routes.append(Route(route.method, path, route.name or ""))
        if is_admin(route):
            admin.add(path)
    return routes, admin


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, list[Route], set[str]]]:
    """The real app with the tiny model on a free port; yields its URL, routes and admin paths."""
    app = create_app(settings)
    routes, admin = routes_of(app, app[ENGINE].model_card.model_id)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", routes, admin
    finally:
        await runner.cleanup()


async def call(
    session: ClientSession, route: Route, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    """Send ``route`` an empty JSON object (enough to get past auth; the handler may then say 400)."""
    body: dict[str, Any] = {"json": {}} if route.method == "POST" else {}
    async with session.request(route.method, route.path, headers=headers, **body) as response:
        payload: Any = None
        if route.method != "HEAD" and response.content_type == "application/json":
            payload = await response.json()
        return response.status, dict(response.headers), payload


def shape_of_401(route: Route, payload: Any) -> str | None:
    """None when ``payload`` is the route family's error shape, else what is wrong."""
    if route.method == "HEAD":
        return None
    if route.family in ("native", "multipart"):
        ok = isinstance(payload, dict) and set(payload) == {"detail"}
    elif route.family == "extras":
        ok = isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], str)
    else:  # openai and ops: {"error": {"message", ...}}
        ok = (
            isinstance(payload, dict)
            and isinstance(payload.get("error"), dict)
            and "message" in payload["error"]
        )
    return None if ok else f"{route} ({route.family}): 401 body {payload!r}"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory, api_key=API_KEY, admin_key=ADMIN_KEY)


async def test_the_router_lists_every_family_and_every_admin_route(keyed: Settings) -> None:
    async with serving(keyed) as (_, routes, admin):
        families = {route.family for route in routes}
        assert {"native", "openai", "extras", "multipart", "ops"} <= families
        assert admin == {"/v1/model/load", "/v1/model/unload", "/v1/model/offload"}
        assert len(routes) > 30


async def test_no_key_and_wrong_key_are_401_except_on_probes(keyed: Settings) -> None:
    problems: list[str] = []
    async with serving(keyed) as (url, routes, _), ClientSession(url) as session:
        for route in routes:
            for label, headers in (("no key", {}), ("wrong key", bearer("not-the-key"))):
                status, response_headers, payload = await call(session, route, headers)
                if route.name in OPEN_FILE_ROUTES:
                    if status != 404:
                        problems.append(f"{label}: {route} is an open file route but answered {status}")
                    continue
                if route.path in OPEN_PATHS or route.path == METRICS_PATH:
                    if status != 200:
                        problems.append(f"{label}: {route} is open but answered {status}")
                    continue
                challenge = response_headers.get("WWW-Authenticate", "")
                if status != 401 or not challenge.startswith("Bearer"):
                    problems.append(f"{label}: {route} answered {status}, WWW-Authenticate {challenge!r}")
                elif label == "wrong key" and 'error="invalid_token"' not in challenge:
                    problems.append(f"{label}: {route} challenge lacks invalid_token: {challenge!r}")
                elif (wrong := shape_of_401(route, payload)) is not None:
                    problems.append(wrong)
    assert not problems, "\n".join(problems)


async def test_api_key_passes_everywhere_but_admin_routes_refuse_it(keyed: Settings) -> None:
    problems: list[str] = []
    async with serving(keyed) as (url, routes, admin), ClientSession(url) as session:
        for route in routes:
            status, _, payload = await call(session, route, bearer(API_KEY))
            expected_admin = 403
            if route.path in admin and status != expected_admin:
                problems.append(f"API key: admin route {route} answered {status}, not {expected_admin}")
            elif route.path not in admin and status == 401:
                problems.append(f"API key: {route} answered 401: {payload!r}")
            elif route.path in admin and route.method != "HEAD" and "admin key" not in str(payload):
                problems.append(
                    f"API key: admin route {route} refusal does not name the admin key: {payload!r}"
                )
    assert not problems, "\n".join(problems)


async def test_admin_key_opens_admin_routes_and_works_as_api_key(keyed: Settings) -> None:
    problems: list[str] = []
    async with serving(keyed) as (url, routes, admin), ClientSession(url) as session:
        for route in routes:
            status, _, payload = await call(session, route, bearer(ADMIN_KEY))
            if route.path in admin and status != 200:
                problems.append(f"admin key: {route} answered {status}: {payload!r}")
            elif status == 401:
                problems.append(f"admin key: {route} answered 401: {payload!r}")
        # load and unload really happened, in that order, through the worker
        async with session.post("/v1/model/load", headers=bearer(ADMIN_KEY)) as response:
            assert response.status == 200 and (await response.json())["state"] == "ready"
        async with session.post("/v1/model/unload", headers=bearer(ADMIN_KEY)) as response:
            assert response.status == 200 and (await response.json())["state"] == "unloaded"
    assert not problems, "\n".join(problems)


async def test_metrics_can_require_the_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = tiny_settings(tmp_path_factory, api_key=API_KEY, metrics_require_key=True)
    async with serving(settings) as (url, _, _), ClientSession(url) as session:
        async with session.get(METRICS_PATH) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.get(METRICS_PATH, headers=bearer(API_KEY)) as response:
            assert response.status == 200 and "vision_server_" in await response.text()
        for path in OPEN_PATHS:
            async with session.get(path) as response:
                assert response.status == 200, path
