"""Two real server processes behind a real HAProxy running ``service/haproxy.cfg``.

Draining one daemon (SIGTERM) must move traffic to the other without a single failed request:
its /ready turns 503 so HAProxy stops choosing it, requests that still reach it are retried
elsewhere, and the ones it already holds finish. Needs the haproxy binary
(``apt-get install -y haproxy``); skipped with that hint when it is missing.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from tests.processes import ServerProcess
from tests.test_shutdown import png_b64

CONFIG = Path(__file__).parents[1] / "service" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def adapt_config(text: str, front_port: int, backends: list[str]) -> str:
    """The shipped config, unprivileged and local: no user switch, no daemon mode, fast checks."""
    text = re.sub(r"(?m)^\s*(user|group|daemon|stats socket|log /dev/log).*\n", "", text)
    text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>127.0.0.1:{front_port}", text)
    text = re.sub(r"\binter \S+", "inter 100ms", text)
    servers = iter(backends)
    text = re.sub(r"(?m)^(\s*server \S+ )\S+", lambda m: m.group(1) + next(servers), text)
    assert next(servers, None) is None, "the config should name exactly two servers"
    return text


async def caption(session: ClientSession, shade: int) -> int:
    try:
        async with session.post(
            "/process_image", json={"image": png_b64(shade), "prompt": "<CAPTION>"}
        ) as response:
            await response.read()
            return response.status
    except Exception as exc:  # a dropped connection counts as a failure, with its reason
        return f"{type(exc).__name__}: {exc}"  # type: ignore[return-value]


async def jobs_done(url: str) -> int:
    async with ClientSession() as session, session.get(f"{url}/v1/status") as response:
        return int((await response.json())["jobs_done"])


async def load(session: ClientSession, stop: asyncio.Event, results: list[object], worker: int) -> None:
    shade = worker
    while not stop.is_set():
        results.append(await caption(session, shade % 256))
        shade += 7


async def test_draining_one_server_moves_traffic_without_failures(tmp_path: Path) -> None:
    first = ServerProcess.fake(tmp_path, "first", delay=0.15, max_batch_size=4)
    second = ServerProcess.fake(tmp_path, "second", delay=0.15, max_batch_size=4)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        urls = [first.wait_listening(), second.wait_listening()]
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(adapt_config(CONFIG.read_text(), front, [u.split("//")[1] for u in urls]))
        proxy_log = (tmp_path / "haproxy.log").open("wb")
        assert HAPROXY is not None
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=proxy_log, stderr=proxy_log)
        async with ClientSession(f"http://127.0.0.1:{front}", timeout=ClientTimeout(total=60)) as session:
            await _wait_proxy(session, proxy, tmp_path)
            assert await asyncio.gather(*(caption(session, s) for s in range(12))) == [200] * 12
            assert min(await jobs_done(urls[0]), await jobs_done(urls[1])) > 0  # both take work

            stop, results = asyncio.Event(), []
            workers = [asyncio.create_task(load(session, stop, results, n)) for n in range(8)]
            await asyncio.sleep(0.6)
            first.send(signal.SIGTERM)
            code = await asyncio.to_thread(first.wait, 20)
            second_before = await jobs_done(urls[1])
            await asyncio.sleep(1.0)  # keep the load on: everything must now go to the second
            stop.set()
            await asyncio.gather(*workers)
        assert code == 0, first.log_text()
        failures = [r for r in results if r != 200]
        assert not failures, f"{len(failures)} of {len(results)} failed: {failures[:5]}"
        assert len(results) > 30
        assert await jobs_done(urls[1]) > second_before
        assert "model unloaded (shutdown)" in first.log_text()
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        first.close()
        second.close()


async def _wait_proxy(session: ClientSession, proxy: subprocess.Popen[bytes], tmp_path: Path) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if proxy.poll() is not None:
            raise AssertionError((tmp_path / "haproxy.log").read_text())
        try:
            async with session.get("/ready") as response:
                if response.status == 200:
                    await asyncio.sleep(0.5)  # let both servers pass their first checks
                    return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("haproxy did not come up:\n" + (tmp_path / "haproxy.log").read_text())
