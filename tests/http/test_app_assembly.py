"""How ``create_app`` puts the server together: one ordered middleware list, explicit error shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.support.serving import client_for
from vision_server.api import auth, cors, cross_site, host_check, native, openai, ops, proxies, ratelimit
from vision_server.api.access import access_middleware
from vision_server.api.errors import ERROR_SHAPES, ErrorShapes, error_middleware
from vision_server.app import create_app, middlewares
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner


def test_middlewares_in_their_documented_order() -> None:
    everything = Settings(cors_origins=("*",), rate_limit=60, trusted_proxies=("127.0.0.1",))
    assert middlewares(everything) == [
        proxies.forwarded_client_middleware,
        cors.preflight_middleware,
        access_middleware,
        error_middleware,
        host_check.host_check_middleware,
        cross_site.cross_site_middleware,
        ratelimit.rate_limit_middleware,
        auth.auth_middleware,
    ]
    assert middlewares(Settings()) == [
        cors.preflight_middleware,  # refuses preflights with a 403 that names --cors-origin
        access_middleware,
        error_middleware,
        host_check.host_check_middleware,  # loopback: a Host no browser sends unless rebound is a 403
        cross_site.cross_site_middleware,  # a foreign page's POST: 403 in the route's shape
        auth.auth_middleware,
    ]
    network = [
        cors.preflight_middleware,
        access_middleware,
        error_middleware,
        cross_site.cross_site_middleware,
    ]
    assert middlewares(Settings(host="0.0.0.0")) == [*network, auth.auth_middleware]


def test_every_route_has_an_explicit_error_shape(tmp_path: Path) -> None:
    """No route falls back to the default shape by accident (a new family must register).

    HEAD routes (added beside every GET) are included: they share their GET's path."""
    app = create_app(Settings(cache_dir=tmp_path), FakeCaptioner())
    shapes = app[ERROR_SHAPES]
    unregistered = [
        route.resource.canonical
        for route in app.router.routes()
        if route.resource is not None and not shapes.is_registered(route)
    ]
    assert unregistered == []


def test_one_path_cannot_answer_in_two_shapes() -> None:
    app = web.Application()
    route = app.router.add_get("/thing", native.prompts)
    shapes = ErrorShapes(fallback=native.native_error)
    shapes.register([route], ops.ops_error)
    shapes.register([route], ops.ops_error)  # the same shape again is fine
    with pytest.raises(ValueError, match="/thing"):
        shapes.register([route], openai.openai_error)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/models/nope", {"error"}),  # openai: {"error": {...}}
        ("/models/nope", {"error"}),  # the unversioned twin too
        ("/no/such/path", {"detail"}),  # unmatched: the native family's shape
    ],
)
async def test_errors_come_in_the_registered_shape(tmp_path: Path, path: str, shape: set[str]) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        async with session.get(path) as response:
            assert response.status == 404
            assert set(await response.json()) == shape
