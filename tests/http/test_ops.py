"""Probes, status and admin routes on a real server (the tiny model; the fake only to fail or to wait)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import make_mocked_request

from tests.support.images import b64
from tests.support.serving import client_for
from vision_server.api import ops
from vision_server.api.auth import check_admin, is_loopback
from vision_server.api.state import ENGINE
from vision_server.app import create_app
from vision_server.errors import Forbidden, Unauthorized
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve ``app`` on ``host``:<free port>; yields the port."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(address) else address


async def get_json(session: ClientSession, path: str) -> tuple[int, Any]:
    async with session.get(path) as response:
        return response.status, await response.json()


async def post_json(session: ClientSession, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.post(path, **kwargs) as response:
        return response.status, await response.json()


@pytest.fixture(scope="module")
def settings(tiny: Settings) -> Settings:
    return tiny


async def test_health_is_green_with_the_model_unloaded(settings: Settings) -> None:
    async with client_for(settings) as session:
        async with session.get("/health", headers={"X-Request-ID": "probe-1"}) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "probe-1"
            body = await response.json()
        assert body["status"] == "ok" and body["model_loaded"] is False and body["models_loaded"] == []
        assert body["state"] == "unloaded" and body["queue_depth"] == 0
        assert isinstance(body["gpu_available"], bool)
        assert set(body["memory_usage"]) == {"gpu_memory_used", "gpu_memory_total"}
        assert body["uptime"] >= 0
        assert await get_json(session, "/ready") == (200, {"ready": True, "state": "unloaded"})


async def test_admin_load_and_unload_from_loopback(settings: Settings) -> None:
    async with client_for(settings) as session:
        status, loaded = await post_json(session, "/v1/model/load")
        assert status == 200 and loaded["state"] == "ready" and loaded["device"] == "cpu"
        _, health = await get_json(session, "/health")
        assert health["model_loaded"] is True and health["state"] == "ready"
        assert health["models_loaded"] == [settings.default_model_name]
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as r:
            assert r.status == 200
        status, unloaded = await post_json(session, "/v1/model/unload")
        assert status == 200 and unloaded["state"] == "unloaded" and unloaded["loaded_since"] is None
        assert (await get_json(session, "/v1/status"))[1]["state"] == "unloaded"


async def test_admin_offload_moves_to_the_warm_tier_where_there_is_one(settings: Settings) -> None:
    async with client_for(settings) as session:  # the tiny model on the CPU: no tier
        await post_json(session, "/v1/model/load")
        status, body = await post_json(session, "/v1/model/offload")
        assert status == 400 and "no warm tier" in body["error"]["message"]
    fake = FakeCaptioner(offloadable=True)  # stands in for a model on a GPU
    async with client_for(dataclasses.replace(settings, admin_key="root"), fake) as session:
        admin = {"Authorization": "Bearer root"}
        await post_json(session, "/v1/model/load", headers=admin)
        status, body = await post_json(session, "/v1/model/offload", headers=admin)
        assert status == 200 and body["state"] == "offloaded" and fake.offloads == 1
        _, health = await get_json(session, "/health")
        assert health["state"] == "offloaded" and health["model_loaded"] is False
        async with session.get("/metrics") as response:
            text = await response.text()
        assert 'vision_server_model_state{state="offloaded"} 1.0' in text
        assert 'vision_server_model_offloads_total{model="fake-model",reason="admin"} 1.0' in text
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as r:
            assert r.status == 200  # the job wakes it
        assert fake.wakes == 1 and fake.loads == 1
        async with session.get("/metrics") as response:
            text = await response.text()
        assert 'vision_server_model_wake_duration_seconds_count{model="fake-model"} 1.0' in text


async def test_admin_key_is_required_when_configured(settings: Settings) -> None:
    keyed = dataclasses.replace(settings, admin_key="root-secret", api_key="user-secret")
    async with client_for(keyed) as session:
        user = {"Authorization": "Bearer user-secret"}
        async with session.post("/v1/model/load") as response:  # no key at all: the API key check
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"]["code"] == "unauthorized"
        status, body = await post_json(session, "/v1/model/unload", headers=user)
        assert status == 403 and body["error"]["code"] == "forbidden"  # a user may not evict the model
        status, body = await post_json(
            session, "/v1/model/unload", headers={"Authorization": "Bearer root-secret"}
        )
        assert status == 200 and body["state"] == "unloaded"
        assert (await get_json(session, "/v1/status"))[0] == 401  # the admin key also works elsewhere ...
        async with session.get("/v1/status", headers={"Authorization": "Bearer root-secret"}) as response:
            assert response.status == 200  # ... but only when it is sent


async def test_admin_routes_refuse_remote_clients_without_an_admin_key(tmp_path: Any) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    fake = FakeCaptioner()
    app = create_app(Settings(cache_dir=tmp_path, host="0.0.0.0"), fake)
    async with serving(app, "0.0.0.0") as port, ClientSession() as session:
        status, body = await post_json(session, f"http://{address}:{port}/v1/model/load")
        assert status == 403 and "only from this machine" in body["error"]["message"]
        assert fake.loads == 0
        assert (await post_json(session, f"http://127.0.0.1:{port}/v1/model/load"))[0] == 200
        assert fake.loads == 1
        status, _ = await get_json(session, f"http://{address}:{port}/health")  # probes stay open
        assert status == 200


def _request_from(app: web.Application, peer: str, token: str | None = None) -> web.Request:
    transport = SimpleNamespace(
        get_extra_info=lambda name, default=None: (peer, 1234) if name == "peername" else default
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return make_mocked_request("POST", "/v1/model/load", headers=headers, app=app, transport=transport)


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1", False),
    ],
)
def test_admin_check_without_admin_key_is_loopback_only(tmp_path: Any, peer: str, allowed: bool) -> None:
    app = create_app(Settings(cache_dir=tmp_path), FakeCaptioner())
    request = _request_from(app, peer)
    if allowed:
        check_admin(request)
    else:
        with pytest.raises(Forbidden):
            check_admin(request)


def test_admin_check_with_admin_key_ignores_the_address(tmp_path: Any) -> None:
    app = create_app(Settings(cache_dir=tmp_path, admin_key="k"), FakeCaptioner())
    check_admin(_request_from(app, "203.0.113.9", "k"))
    with pytest.raises(Unauthorized):
        check_admin(_request_from(app, "127.0.0.1"))  # loopback alone is not enough any more
    with pytest.raises(Forbidden):
        check_admin(_request_from(app, "127.0.0.1", "wrong"))


async def test_failed_load_answers_503_in_the_ops_shape(tmp_path: Any) -> None:
    fake = FakeCaptioner()
    fake.fail_load = "no weights in /nowhere"
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        async with session.post("/v1/model/load") as response:
            assert response.status == 503 and "Retry-After" in response.headers
            error = (await response.json())["error"]
        assert error["code"] == "model_load_failed" and "no weights" in error["message"]
        assert error["request_id"] == response.headers["X-Request-ID"]
        _, health = await get_json(session, "/health")
        assert health["status"] == "ok" and health["state"] == "failed"  # still alive, still serving


async def test_ready_is_503_while_draining(tmp_path: Any) -> None:
    fake = FakeCaptioner(delay=0.6)
    app = create_app(Settings(cache_dir=tmp_path), fake)
    async with serving(app) as port, ClientSession(f"http://127.0.0.1:{port}") as session:
        job = asyncio.create_task(
            post_json(session, "/process_image", json={"image": b64(2), "prompt": "caption"})
        )
        while app[ENGINE].status().jobs_running == 0:
            await asyncio.sleep(0.01)
        drain = asyncio.create_task(app[ENGINE].stop(grace=5))
        await asyncio.sleep(0.05)
        assert await get_json(session, "/ready") == (503, {"ready": False, "reason": "draining"})
        status, health = await get_json(session, "/health")
        assert status == 200 and health["status"] == "draining"
        assert (await post_json(session, "/v1/model/load"))[0] == 503
        assert (await job)[0] == 200
        await drain


async def test_ready_says_starting_before_the_engine_runs(tmp_path: Any) -> None:
    app = create_app(Settings(cache_dir=tmp_path), FakeCaptioner())
    response = await ops.ready(make_mocked_request("GET", "/ready", app=app))
    assert response.status == 503 and response.text == '{"ready": false, "reason": "starting"}'
