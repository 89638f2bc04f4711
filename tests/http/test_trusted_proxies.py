"""--trusted-proxy over HTTP: the client a trusted proxy names is the one logged, rate-limited and
given bulk turns; without the setting (or from any other peer) X-Forwarded-For changes nothing.

The test client connects from 127.0.0.1, so with ``--trusted-proxy 127.0.0.1`` it plays the proxy.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.gated import GatedFake
from tests.support.images import b64
from tests.support.serving import client_for, running_app
from vision_server.api.state import ENGINE
from vision_server.captioner import Caption, CaptionItem
from vision_server.engine.scheduler import Engine
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

LOCAL_PROXY = ("127.0.0.1",)


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vision_server.access" and r.route == "native.prompts"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("trusted", [LOCAL_PROXY, ()], ids=["trusted", "not-trusted"])
async def test_access_log_and_rate_limit_see_the_forwarded_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, trusted: tuple[str, ...]
) -> None:
    caplog.set_level(logging.INFO, logger="vision_server.access")
    settings = Settings(cache_dir=tmp_path, rate_limit=2, trusted_proxies=trusted)
    async with client_for(settings, FakeCaptioner()) as session:
        statuses = []
        for address in ("203.0.113.7", "203.0.113.7", "198.51.100.9", "203.0.113.7"):
            async with session.get("/prompts", headers=forwarded(address)) as r:
                statuses.append(r.status)
        async with session.get("/prompts") as r:  # the proxy's own request: its own address
            statuses.append(r.status)
    lines = access_lines(caplog)
    clients = [r.client for r in lines]  # type: ignore[attr-defined]
    if trusted:
        # Each client has its own bucket of two: only 203.0.113.7's third request is refused.
        assert statuses == [200, 200, 200, 429, 200]
        assert clients == ["203.0.113.7", "203.0.113.7", "198.51.100.9", "203.0.113.7", "127.0.0.1"]
        assert [r.via for r in lines] == ["127.0.0.1"] * 4 + [None]  # type: ignore[attr-defined]
        assert "client=203.0.113.7 via=127.0.0.1" in lines[0].getMessage()
        assert "via=" not in lines[-1].getMessage()
    else:
        # The header is ignored: every request is 127.0.0.1's, sharing one bucket of two.
        assert statuses == [200, 200, 429, 429, 429]
        assert clients == ["127.0.0.1"] * 5
        assert all(r.via is None and "via=" not in r.getMessage() for r in lines)  # type: ignore[attr-defined]


async def test_an_ipv6_client_is_rate_limited_by_its_64(tmp_path: Path) -> None:
    """A client given a /64 (every IPv6 home line and host) used to take a fresh bucket per
    request by changing its address; its neighbours in other /64s keep their own."""
    settings = Settings(cache_dir=tmp_path, rate_limit=2, trusted_proxies=LOCAL_PROXY)
    statuses = []
    async with client_for(settings, FakeCaptioner()) as session:
        for address in ("2001:db8::1", "2001:db8::2", "2001:db8::ffff:3", "2001:db8:0:1::1"):
            async with session.get("/prompts", headers=forwarded(address)) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 429, 200]


async def test_untrusted_peer_and_garbage_headers_are_ignored_not_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vision_server.access")
    settings = Settings(cache_dir=tmp_path, trusted_proxies=("10.0.0.0/8", "::1"))  # not 127.0.0.1
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/prompts", headers=forwarded("203.0.113.7")) as r:
            assert r.status == 200
    settings = Settings(cache_dir=tmp_path, trusted_proxies=LOCAL_PROXY)
    async with client_for(settings, FakeCaptioner()) as session:
        for header in ("unknown", "203.0.113.7, ???", "[::1", "1" * 4000, ", ,"):
            async with session.get("/prompts", headers=forwarded(header)) as r:
                assert r.status == 200, header
    clients = [r.client for r in access_lines(caplog)]  # type: ignore[attr-defined]
    assert clients == ["127.0.0.1"] * 6


async def test_forwarded_requests_never_count_as_loopback_for_admin_routes(tmp_path: Path) -> None:
    """The proxy is local and even names a loopback client: without an admin key it is still a 403."""
    settings = Settings(cache_dir=tmp_path, trusted_proxies=LOCAL_PROXY)
    async with client_for(settings, FakeCaptioner()) as session:
        for header in ("127.0.0.1", "203.0.113.7"):
            async with session.post("/v1/model/unload", headers=forwarded(header)) as r:
                assert r.status == 403, header
                assert "--admin-key" in await r.text()
        async with session.post("/v1/model/unload") as r:  # really on this machine
            assert r.status == 200, await r.text()


class RecordingGate(GatedFake):
    """Holds the worker like :class:`GatedFake` and notes every caption in the order made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        captions = super().caption(batch)
        self.made += [c.text for c in captions]
        return captions


async def queued(engine: Engine, bulk: int) -> None:
    for _ in range(500):
        if engine.status().lane_depths.get("bulk") == bulk:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"lanes are {engine.status().lane_depths}, expected {bulk} bulk jobs")


# Host A's addresses (its first one holds the worker) and host B's.
IPV4_HOSTS = (("203.0.113.1",) * 4, "198.51.100.2")
# One IPv6 host sends from any address of its /64: it is one host, as for the rate limit.
IPV6_HOSTS = (
    ("2001:db8:1:1::a", "2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:1:ffff::3"),
    "2001:db8:2::1",
)


@pytest.mark.parametrize(
    ("trusted", "hosts"),
    [(LOCAL_PROXY, IPV4_HOSTS), ((), IPV4_HOSTS), (LOCAL_PROXY, IPV6_HOSTS)],
    ids=["trusted", "not-trusted", "ipv6-by-64"],
)
async def test_bulk_turns_go_by_the_forwarded_host(
    tmp_path: Path, trusted: tuple[str, ...], hosts: tuple[tuple[str, ...], str]
) -> None:
    """Host A queues three bulk jobs, then host B one. As two hosts, B's job is second; as one
    host (the proxy's address), it is last."""
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_batch_size=1, trusted_proxies=trusted)
    fake = RecordingGate()
    a_addresses, b_address = hosts
    async with running_app(settings, fake) as (app, url), ClientSession(url) as session:

        def post(seed: int, host: str) -> asyncio.Task[Any]:
            body = {"image": b64(seed), "prompt": "<CAPTION>"}
            headers = {**forwarded(host), "X-Priority": "bulk"}
            return asyncio.create_task(session.post("/process_image", json=body, headers=headers))

        first = post(0, a_addresses[0])  # runs at once and holds the worker
        assert await asyncio.to_thread(fake.entered.wait, 10)
        waiting = []
        for seed, host in enumerate((*a_addresses[1:], b_address), start=1):
            waiting.append(post(seed, host))
            await queued(app[ENGINE], len(waiting))
        fake.gate.set()
        responses = await asyncio.gather(first, *waiting)
        answers = []
        for response in responses:
            assert response.status == 200
            answers.append((await response.json())["result"])
            response.release()
    order = [answers.index(text) for text in fake.made]
    assert order == ([0, 1, 4, 2, 3] if trusted else [0, 1, 2, 3, 4])
