"""Graceful shutdown of a real server process, and its systemd notifications.

SIGTERM while jobs wait: every queued request still gets its caption, ``/ready`` answers 503
during the drain (the port stays open so a load balancer sees it), new jobs get 503, the model
is unloaded and the exit code is 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientError, ClientSession, ClientTimeout

from tests.support.api import tiny_settings
from tests.support.images import shade_b64
from tests.support.processes import ServerProcess, cli_command, server_env
from vision_server.sdnotify import Notifier, socket_address

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and sd_notify sockets")


class NotifyListener:
    """A stand-in for systemd: a datagram socket that collects what the server sends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifyListener]:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract unix sockets are Linux-only")
    listener = NotifyListener(f"@vision-server-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


async def caption(session: ClientSession, shade: int) -> int:
    async with session.post("/process_image", json={"image": shade_b64(shade), "prompt": "<CAPTION>"}) as r:
        await r.read()
        return r.status


async def wait_for_status(session: ClientSession, *, running: int, queued: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        async with session.get("/v1/status") as response:
            data = await response.json()
        if data["jobs_running"] == running and data["queue_depth"] == queued:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine never reached running={running} queued={queued}: {data}")


async def test_sigterm_drains_queued_jobs_then_exits_zero(
    tmp_path: Path, notify_socket: NotifyListener
) -> None:
    log_file = tmp_path / "server.jsonl"
    env = {"NOTIFY_SOCKET": notify_socket.address}
    with ServerProcess.fake(
        tmp_path, "drain", delay=0.8, env=env, max_batch_size=1, log_format="json", log_file=log_file
    ) as server:
        url = server.wait_listening()
        async with ClientSession(url, timeout=ClientTimeout(total=30)) as session:
            jobs = [asyncio.create_task(caption(session, shade)) for shade in range(4)]
            await wait_for_status(session, running=1, queued=3)
            server.send(signal.SIGTERM)
            ready = await _until_status(session, "/ready", 503)
            assert ready == {"ready": False, "reason": "draining"}
            async with session.get("/health") as response:  # liveness stays green while draining
                assert response.status == 200 and (await response.json())["status"] == "draining"
            async with session.post(
                "/process_image", json={"image": shade_b64(99), "prompt": "<CAPTION>"}
            ) as refused:
                assert refused.status == 503 and refused.headers["Retry-After"] == "5"
            assert await asyncio.gather(*jobs) == [200, 200, 200, 200]
        assert server.wait(15) == 0, server.log_text()

    text = server.log_text()
    assert "model unloaded (shutdown)" in text and '"message": "stopped"' in text
    messages = notify_socket.drain()
    assert messages[0].startswith("READY=1\nSTATUS=model unloaded, queue 0, running 0")
    stopping = next(i for i, m in enumerate(messages) if m.startswith("STOPPING=1"))
    assert "draining" in messages[stopping]
    assert any(m.startswith("STATUS=") for m in messages[1:stopping])  # queue updates while it ran
    # --log-file with --log-format json: one access line per request, with the engine's numbers
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "vision_server.access"]
    served = [line for line in access if line["route"] == "native.process_image" and line["status"] == 200]
    assert len(served) == 4
    assert all(line["batch_size"] == 1 and line["queue_wait"] >= 0 and line["request_id"] for line in served)
    assert max(line["queue_wait"] for line in served) > 1.5  # the last job waited for three others
    assert not any(shade_b64(0)[:40] in line for line in log_file.read_text().splitlines())


async def _until_status(session: ClientSession, path: str, status: int, timeout: float = 5) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        async with session.get(path) as response:
            if response.status == status:
                return await response.json()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never answered {status}")


@pytest.mark.skipif(
    sys.platform == "win32" or signal.getsignal(getattr(signal, "SIGHUP", signal.SIGINT)) is signal.SIG_IGN,
    reason="POSIX only; under nohup the server inherits an ignored SIGHUP and rightly keeps it",
)
async def test_sighup_drains_like_sigterm(tmp_path: Path) -> None:
    """A closed terminal or a ``kill -HUP`` (no reload here) used to kill the process mid-request."""
    with ServerProcess.fake(tmp_path, "hangup", delay=1.5) as server:
        url = server.wait_listening()
        async with ClientSession(url, timeout=ClientTimeout(total=30)) as session:
            job = asyncio.create_task(caption(session, 1))
            await wait_for_status(session, running=1, queued=0)
            server.send(signal.SIGHUP)
            assert await job == 200
        assert await asyncio.to_thread(server.wait, 20) == 0, server.log_text()
    assert "stop signal 1: draining" in server.log_text()


async def test_a_body_still_arriving_at_the_stop_gets_503_and_does_not_hold_the_exit(tmp_path: Path) -> None:
    """A slow upload used to hold its connection until the close timeout cancelled it (no answer,
    ~10 s past the drain); its job would have been refused anyway."""
    with ServerProcess.fake(tmp_path, "upload", delay=0) as server:
        host, port = server.wait_listening().removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /process_image HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"image": "iVBORw0KGgo'
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is reading the body (or not yet: 503 all the same)
        server.send(signal.SIGTERM)
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert b"Retry-After: 5" in reply and b"shutting down" in reply
        assert await asyncio.to_thread(server.wait, 20) == 0, server.log_text()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    with ServerProcess.fake(tmp_path, "twice", delay=30) as server:
        url = server.wait_listening()
        async with ClientSession(url, timeout=ClientTimeout(total=30)) as session:
            job = asyncio.create_task(caption(session, 1))
            await wait_for_status(session, running=1, queued=0)
            server.send(signal.SIGTERM)
            await _until_status(session, "/ready", 503)
            started = time.monotonic()
            server.send(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, 5)
            assert time.monotonic() - started < 3
            assert code == 128 + signal.SIGTERM
            with pytest.raises(ClientError):
                await job
    assert "second stop signal" in server.log_text()


async def test_cli_serve_real_model_sigint(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """``vision-server serve --model test:tiny``: real model, Ctrl+C, clean exit."""
    settings = tiny_settings(tmp_path_factory)
    env = server_env(tmp_path)
    command = [
        *cli_command(),
        "serve",
        "--model",
        "test:tiny",
        "--cache-dir",
        str(settings.cache_dir),
        "--port",
        "0",
        "--preload",
    ]
    with ServerProcess(command, env, tmp_path / "cli.log") as server:
        url = server.wait_listening(timeout=90)
        async with ClientSession(url, timeout=ClientTimeout(total=60)) as session:
            async with session.get("/health") as response:
                assert (await response.json())["model_loaded"] is True
            assert await caption(session, 3) == 200
        server.send(signal.SIGINT)
        assert server.wait(30) == 0, server.log_text()
    assert "model unloaded (shutdown)" in server.log_text()


# --- sd_notify itself ------------------------------------------------------------------------------


def test_notifier_writes_to_a_path_socket(tmp_path: Path) -> None:
    path = Path(f"/tmp/vs-{uuid.uuid4().hex[:12]}.sock")  # short: unix socket paths max ~107 bytes
    listener = NotifyListener(str(path))
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("model unloaded")
        assert notifier.stopping("draining")
        assert listener.drain() == [
            f"READY=1\nSTATUS=model unloaded\nMAINPID={os.getpid()}",
            "STOPPING=1\nSTATUS=draining",
        ]
    finally:
        listener.close()


def test_notifier_is_a_no_op_outside_systemd(tmp_path: Path) -> None:
    assert not Notifier.from_environ({}).enabled
    assert Notifier.from_environ({}).ready("x") is False
    assert Notifier(str(tmp_path / "nobody-listens.sock")).status("x") is False  # errors are swallowed


def test_abstract_socket_address() -> None:
    assert socket_address("@systemd/notify") == "\0systemd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


async def test_cli_serve_drains_twenty_in_flight_on_sigterm(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The real CLI and model: 20 requests in flight (19 queued behind one) at SIGTERM all get
    200, requests that arrive during the drain get 503, and the process exits 0."""
    settings = tiny_settings(tmp_path_factory)
    env = server_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"  # steady per-caption time on a shared 2-core machine
    command = [
        *cli_command(),
        "serve",
        "--model", "test:tiny",
        "--cache-dir", str(settings.cache_dir),
        "--port", "0",
        "--preload",
        "--max-batch-size", "1",  # one job at a time: the other 19 wait in the queue
        "--num-beams", "1",
        "--max-new-tokens", "160",
        "--min-new-tokens", "160",  # every caption is 160 tokens: the drain takes a few seconds
    ]  # fmt: skip
    with ServerProcess(command, env, tmp_path / "cli-drain.log") as server:
        url = server.wait_listening(timeout=90)
        async with ClientSession(url, timeout=ClientTimeout(total=120)) as session:
            jobs = [asyncio.create_task(caption(session, shade)) for shade in range(20)]
            status = await _until_all_submitted(session, 20)
            assert status["queue_depth"] > 0, status
            server.send(signal.SIGTERM)
            await _until_status(session, "/ready", 503)
            refused = [await caption(session, 200 + n) for n in range(3)]
            assert not all(job.done() for job in jobs), "the drain was over before the new requests"
            assert refused == [503, 503, 503]
            assert await asyncio.gather(*jobs) == [200] * 20
        assert server.wait(30) == 0, server.log_text()
    text = server.log_text()
    held = re.search(r"draining \((\d+) queued, (\d+) running", text)
    assert held is not None and int(held.group(1)) > 0, text  # the queue was not empty at SIGTERM
    assert "model unloaded (shutdown)" in text
    assert text.count("POST /process_image 200") == 20 and text.count("POST /process_image 503") == 3


async def _until_all_submitted(session: ClientSession, count: int, timeout: float = 30) -> dict[str, int]:
    """The engine status once all ``count`` jobs are queued, running or done (none lost on the way)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        async with session.get("/v1/status") as response:
            data = await response.json()
        if data["queue_depth"] + data["jobs_running"] + data["jobs_done"] >= count:
            return dict(data)
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server never held all {count} jobs: {data}")
