"""Two real server processes behind a real HAProxy running ``service/haproxy.cfg``.

Draining one daemon (SIGTERM) must move traffic to the other without a single failed request:
its /ready turns 503 so HAProxy stops choosing it, requests that still reach it are retried
elsewhere, and the ones it already holds finish. Load spreads over both daemons, and a daemon
killed outright costs only the requests it held. Needs the haproxy binary
(``apt-get install -y haproxy``); skipped with that hint when it is missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from tests.support import paths
from tests.support.api import tiny_cache_dir
from tests.support.images import image_bytes, shade_b64
from tests.support.processes import ServerProcess, free_port, tiny_server
from tests.support.tls import self_signed

CONFIG = paths.SERVICE / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


def adapt_config(text: str, front_port: int, backends: list[str], *, admin_socket: Path | None = None) -> str:
    """The shipped config, unprivileged and local: no user switch, no daemon mode, fast checks;
    the runtime API on ``admin_socket`` when given, else none."""
    if admin_socket is not None:
        text = re.sub(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{admin_socket}", text)
    dropped = "user|group|daemon|log /dev/log" + ("" if admin_socket is not None else "|stats socket")
    text = re.sub(rf"(?m)^\s*({dropped}).*\n", "", text)
    text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>127.0.0.1:{front_port}", text)
    text = re.sub(r"\binter \S+", "inter 100ms", text)
    servers = iter(backends)
    text = re.sub(r"(?m)^(\s*server \S+ )\S+", lambda m: m.group(1) + next(servers), text)
    assert next(servers, None) is None, "the config should name exactly two servers"
    return text


async def caption(session: ClientSession, shade: int) -> int:
    try:
        async with session.post(
            "/process_image", json={"image": shade_b64(shade), "prompt": "<CAPTION>"}
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

            stop, results = asyncio.Event(), list[object]()
            workers = [asyncio.create_task(load(session, stop, results, n)) for n in range(8)]
            # Counts, not fixed times (0.6 s, then 1 s and more than 30 answers in all): a loaded
            # machine answers fewer in a given time.
            await _until(lambda: len(results) >= 16, "16 answers before the drain")
            first.send(signal.SIGTERM)
            code = await asyncio.to_thread(first.wait, 20)
            second_before = await jobs_done(urls[1])
            drained = len(results)
            # keep the load on: everything must now go to the second
            await _until(lambda: len(results) >= drained + 16, "16 answers after the drain")
            stop.set()
            await asyncio.gather(*workers)
        assert code == 0, first.log_text()
        failures = [r for r in results if r != 200]
        assert not failures, f"{len(failures)} of {len(results)} failed: {failures[:5]}"
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


# --- spreading load, and losing a daemon without warning ---------------------------------------


@contextlib.asynccontextmanager
async def proxied_pool(
    tmp_path: Path,
    daemons: list[ServerProcess],
    *,
    client_address: str | None = None,
    admin_socket: Path | None = None,
) -> AsyncIterator[tuple[ClientSession, list[str], Path]]:
    """HAProxy on ``service/haproxy.cfg`` in front of ``daemons`` (gpu1, gpu2 in that order);
    yields a client session on the front end (connecting from ``client_address`` when given),
    the daemons' own URLs and HAProxy's log. The runtime API listens on ``admin_socket`` when
    given."""
    proxy: subprocess.Popen[bytes] | None = None
    proxy_log_path = tmp_path / "haproxy.log"
    try:
        urls = [daemon.wait_listening(timeout=120) for daemon in daemons]
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        backends = [u.split("//")[1] for u in urls]
        config.write_text(adapt_config(CONFIG.read_text(), front, backends, admin_socket=admin_socket))
        assert HAPROXY is not None
        with proxy_log_path.open("wb") as proxy_log:
            proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=proxy_log, stderr=proxy_log)
        connector = TCPConnector(local_addr=(client_address, 0)) if client_address else None
        async with ClientSession(
            f"http://127.0.0.1:{front}", connector=connector, timeout=ClientTimeout(total=60)
        ) as session:
            await _wait_proxy(session, proxy, tmp_path)
            yield session, urls, proxy_log_path
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for daemon in daemons:
            daemon.close()


def tiny_daemon(tmp_path: Path, name: str, cache_dir: Path) -> ServerProcess:
    """``vision-server serve --model test:tiny`` with fixed 32-token captions."""
    options = ["--num-beams", "1", "--max-new-tokens", "32", "--min-new-tokens", "32"]
    # two daemons share two cores
    return tiny_server(tmp_path, cache_dir, *options, name=name, env={"OMP_NUM_THREADS": "1"})


async def test_load_spreads_over_both_real_daemons(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    cache_dir = tiny_cache_dir(tmp_path_factory)
    daemons = [tiny_daemon(tmp_path, "gpu1", cache_dir), tiny_daemon(tmp_path, "gpu2", cache_dir)]
    async with proxied_pool(tmp_path, daemons) as (session, urls, _):
        before = [await jobs_done(url) for url in urls]
        stop, results = asyncio.Event(), list[object]()
        workers = [asyncio.create_task(load(session, stop, results, n)) for n in range(8)]
        while len(results) < 60:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        done = [await jobs_done(url) - start for url, start in zip(urls, before, strict=True)]
    assert results == [200] * len(results)
    assert sum(done) == len(results), done  # every request was captioned exactly once
    assert min(done) >= 0.3 * len(results), f"uneven spread {done} of {len(results)}"


async def post_image(session: ClientSession, image: bytes) -> object:
    try:
        body = {"image": base64.b64encode(image).decode(), "prompt": "<CAPTION>"}
        async with session.post("/process_image", json=body) as response:
            await response.read()
            return response.status
    except Exception as exc:  # a dropped connection counts as a failure, with its reason
        return f"{type(exc).__name__}: {exc}"


async def test_killed_daemon_loses_only_its_in_flight_requests(tmp_path: Path) -> None:
    """SIGKILL one daemon under load: the requests it held fail, nothing else does.

    The images are larger than HAProxy's buffer (tune.bufsize, 16 KB), so HAProxy cannot replay
    them elsewhere (``retry-on empty-response`` rescues only small requests): whatever was in
    flight on the dead daemon fails. Requests sent after the kill are redispatched (connection
    refused is retried), and once the health check marks it DOWN all traffic goes to the other.

    Which requests the daemon holds at the kill is made certain, not sampled: it is paused
    (SIGSTOP) until HAProxy counts a request on it, no new request is sent, and the kill comes
    once every request still in flight is one it holds. A snapshot of its status taken before
    the kill could find it between batches (nothing held), and requests sent while it was
    being torn down went out on its dying connections; both made the test fail now and then."""
    first = ServerProcess.fake(tmp_path, "gpu1", delay=0.3, max_batch_size=4)
    second = ServerProcess.fake(tmp_path, "gpu2", delay=0.3, max_batch_size=4)
    large = [image_bytes(seed, size=(120, 120)) for seed in range(4)]  # ~43 KB each
    assert min(len(image) for image in large) > 32_000
    admin = tmp_path / "admin.sock"
    async with proxied_pool(tmp_path, [first, second], admin_socket=admin) as (session, urls, proxy_log):
        timeline: list[tuple[float, float, object]] = []  # (sent, answered, status or error)
        sending = asyncio.Event()  # cleared: each worker waits before its next request
        sending.set()
        in_flight = 0

        async def timed_load(stop: asyncio.Event, worker: int) -> None:
            nonlocal in_flight
            count = worker
            while not stop.is_set():
                await sending.wait()
                sent = time.monotonic()
                in_flight += 1
                outcome = await post_image(session, large[count % len(large)])
                in_flight -= 1
                timeline.append((sent, time.monotonic(), outcome))
                count += 1

        stop = asyncio.Event()
        workers = [asyncio.create_task(timed_load(stop, n)) for n in range(8)]
        await _until(lambda: len(timeline) >= 8, "the first answers")
        first.send(signal.SIGSTOP)  # it holds whatever HAProxy sends it from now on
        await _until(lambda: _sessions_on(admin, "gpu1") > 0, "a request held by the paused gpu1")
        sending.clear()
        # The requests on gpu2 finish; those on gpu1 cannot: then every one in flight is gpu1's.
        await _until(lambda: in_flight == _sessions_on(admin, "gpu1"), "gpu2's requests done")
        held = in_flight
        killed_at = time.monotonic()
        first.send(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)  # gone: its sockets are closed, new ones refused
        sending.set()
        noticed_at = await _until_logged(proxy_log, "Server vision/gpu1 is DOWN")
        second_before = await jobs_done(urls[1])
        # Load goes on (HAProxy sends everything to gpu2 now) until enough requests sent after the
        # notice are answered; waiting for a count, not a fixed time, keeps a slow machine honest.
        await _until(lambda: sum(sent > noticed_at for sent, _, _ in timeline) >= 16, "16 answers")
        stop.set()
        await asyncio.gather(*workers)
        second_after = await jobs_done(urls[1])
    assert first.process.returncode == -signal.SIGKILL
    assert held > 0
    failed = [(sent, answered, outcome) for sent, answered, outcome in timeline if outcome != 200]
    in_flight_at_kill = [entry for entry in timeline if entry[0] < killed_at < entry[1]]
    # Nothing sent after the kill fails: a refused connection is retried on gpu2 until the
    # health check takes gpu1 out. Exactly the requests it held fail, none answered before it.
    assert all(sent < killed_at for sent, _, _ in failed), f"sent after the kill: {failed}"
    assert sorted(failed) == sorted(in_flight_at_kill) and len(failed) == held, (failed, held)
    after_notice = [outcome for sent, _, outcome in timeline if sent > noticed_at]
    assert len(after_notice) >= 16 and after_notice == [200] * len(after_notice)
    assert second_after - second_before >= len(after_notice)


def _sessions_on(admin: Path, server: str) -> int:
    """How many requests HAProxy has on ``server`` now (``scur`` of ``show stat``)."""
    lines = runtime_api(admin, "show stat").splitlines()
    header = lines[0].removeprefix("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "vision" and row.get("svname") == server:
            return int(row["scur"])
    raise AssertionError(f"no {server} in HAProxy's stats: {lines}")


async def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for ``condition`` (a generous limit: a loaded machine is slow, not stuck)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"never reached: {what}"
        await asyncio.sleep(0.01)


async def _until_logged(path: Path, text: str, timeout: float = 10) -> float:
    """The monotonic time at which ``text`` was first seen in the log at ``path``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in path.read_text(errors="replace"):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared:\n{path.read_text(errors='replace')}")


# --- the client's address through the proxy ------------------------------------------------------


def can_bind(address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


async def test_daemons_behind_haproxy_see_the_real_client(tmp_path: Path) -> None:
    """The client connects from 127.0.0.2, HAProxy from 127.0.0.1 (trusted by the daemons).

    With the shipped config's ``option forwardfor`` and ``--trusted-proxy 127.0.0.1`` the daemons
    log 127.0.0.2 as the client and HAProxy as ``via``; without either they would log 127.0.0.1.
    An address the client writes into X-Forwarded-For itself is passed over: HAProxy adds the
    address it saw to the right of it, and that one is not a trusted proxy."""
    if not can_bind("127.0.0.2"):
        pytest.skip("127.0.0.2 is not a local address here (loopback is only 127.0.0.1)")
    trusting: dict[str, Any] = {"trusted_proxies": "127.0.0.1"}
    daemons = [ServerProcess.fake(tmp_path, name, delay=0, **trusting) for name in ("gpu1", "gpu2")]
    async with proxied_pool(tmp_path, daemons, client_address="127.0.0.2") as (session, _, _):
        for spoofed in (None, "198.51.100.66"):
            headers = {"X-Forwarded-For": spoofed} if spoofed else {}
            for _ in range(4):  # leastconn may pick either daemon
                async with session.get("/prompts", headers=headers) as response:
                    assert response.status == 200
        logs = "".join(daemon.log_text() for daemon in daemons)
    lines = [line for line in logs.splitlines() if "route=native.prompts" in line]
    assert len(lines) == 8, logs
    assert all("client=127.0.0.2 via=127.0.0.1" in line for line in lines), lines
    assert "198.51.100.66" not in logs


# --- HTTPS and an API key, with the config's own commented TLS lines ----------------------------


def with_tls(text: str, front_port: int, pem: Path, ca: Path) -> str:
    """The adapted config with its HTTPS lines switched on as the docs say: the ``ssl crt`` bind
    instead of the plain one, and the ``default-server ssl`` line for daemons on HTTPS."""
    text, plain = re.subn(rf"(?m)^\s*bind 127\.0\.0\.1:{front_port}\n", "", text)
    text, front = re.subn(
        r"(?m)^(\s*)# (bind ):54880( ssl crt )\S+$", rf"\g<1>\g<2>127.0.0.1:{front_port}\g<3>{pem}", text
    )
    text, back = re.subn(
        r"(?m)^(\s*)# (default-server ssl verify required ca-file )\S+$", rf"\g<1>\g<2>{ca}", text
    )
    assert (plain, front, back) == (1, 1, 1), "the config should carry both commented HTTPS lines"
    return text


async def test_https_pool_with_an_api_key(tmp_path: Path) -> None:
    """The operator's recipe (docs/operations/haproxy.md): clients speak HTTPS to HAProxy, which
    checks and calls daemons started with --ssl-cert and --api-key over HTTPS too; /ready needs no
    key, captions do, and the key passes through HAProxy untouched."""
    cert, key = self_signed(tmp_path)
    pem = tmp_path / "vision-server.pem"  # what `cat cert.pem key.pem > vision-server.pem` makes
    pem.write_text(cert.read_text() + key.read_text())
    secured: dict[str, Any] = {"api_key": "pool-key", "ssl_cert": cert, "ssl_key": key}
    daemons = [ServerProcess.fake(tmp_path, name, delay=0, **secured) for name in ("gpu1", "gpu2")]
    proxy: subprocess.Popen[bytes] | None = None
    try:
        urls = [daemon.wait_listening() for daemon in daemons]
        assert all(url.startswith("https://") for url in urls)
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        adapted = adapt_config(CONFIG.read_text(), front, [url.split("//")[1] for url in urls])
        config.write_text(with_tls(adapted, front, pem, cert))
        assert HAPROXY is not None
        with (tmp_path / "haproxy.log").open("wb") as proxy_log:
            proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=proxy_log, stderr=proxy_log)
        trusted = ssl.create_default_context(cafile=str(cert))
        async with ClientSession(
            f"https://localhost:{front}", connector=TCPConnector(ssl=trusted), timeout=ClientTimeout(total=60)
        ) as session:
            await _wait_proxy(session, proxy, tmp_path)  # /ready through HTTPS, without the key
            body = {"image": shade_b64(40), "prompt": "<CAPTION>"}
            async with session.post("/process_image", json=body) as response:
                assert response.status == 401 and "Bearer" in response.headers["WWW-Authenticate"]
            keyed = {"Authorization": "Bearer pool-key"}
            for _ in range(4):  # leastconn may pick either daemon: both must take the key
                async with session.post("/process_image", json=body, headers=keyed) as response:
                    assert response.status == 200 and (await response.json())["result"]
        log = (tmp_path / "haproxy.log").read_text(errors="replace")
        # The servers start UP and fall after one failed check (100 ms apart): checks over plain
        # HTTP to the HTTPS daemons would have taken both down before the captions above.
        assert "is DOWN" not in log, log
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for daemon in daemons:
            daemon.close()


# --- an overnight folder run through the pool while the operator maintains it -------------------

VISION_CLIENT = Path(sys.executable).with_name("vision-client")
FOLDER_SCRIPT = paths.CLIENTS / "vision-caption-folder-images.sh"
# The drain the config's own comment gives for the runtime API.
DRAIN = re.search(r'echo "(set server \S+ state drain)"', CONFIG.read_text())


def http_status(url: str) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def runtime_api(socket_path: Path, command: str) -> str:
    """One command on HAProxy's runtime API (what ``echo ... | socat stdio SOCKET`` does)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def folder_runs(url: str, folders: dict[str, Path]) -> dict[str, subprocess.Popen[str]]:
    """``vision-client folder`` and the bash script, each on its folder, 8 requests in flight."""
    python = [str(VISION_CLIENT), "--url", url, "folder", str(folders["python"]), "-j", "8", "-t", "caption"]
    bash = ["bash", str(FOLDER_SCRIPT), "--url", url, "--jobs", "8", "CAPTION", "txt", str(folders["bash"])]
    commands = {"python": python, "bash": bash}
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
    return {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, command in commands.items()
    }


def wait_until(done: Callable[[], bool], runs: dict[str, subprocess.Popen[str]], what: str) -> None:
    """Wait for ``done`` while the runs go on (a run that ends first fails the test)."""
    end = time.monotonic() + 120
    while not done():
        assert all(run.poll() is None for run in runs.values()), f"a run ended before {what}"
        assert time.monotonic() < end, f"never reached: {what}"
        time.sleep(0.02)


def test_folder_runs_through_the_pool_outlive_its_maintenance(tmp_path: Path) -> None:
    """Both folder clients caption through the pool while the operator (a) drains gpu1 through
    the runtime API and puts it back, (b) SIGKILLs gpu2 with work in it and starts it again,
    (c) reloads HAProxy (SIGUSR2 to the master process: what ``systemctl reload haproxy`` does).

    The images are larger than HAProxy's buffer, so it cannot replay the requests the kill broke:
    the clients send them again. Every image ends with one caption, the runs exit 0 with a true
    summary, and a rerun finds nothing to do. Last, what the docs warn of: a reload forgets a
    drain made through the runtime API."""
    assert DRAIN is not None, "the config's comment should give the runtime API's drain command"
    ports = [free_port(), free_port()]

    def daemon(name: str, port: int) -> ServerProcess:
        return ServerProcess.fake(tmp_path, name, delay=0.3, max_batch_size=4, port=port)

    daemons = [daemon("gpu1", ports[0]), daemon("gpu2", ports[1])]
    folders = {name: tmp_path / name for name in ("python", "bash")}
    for folder in folders.values():
        folder.mkdir()
        for seed in range(60):
            (folder / f"img{seed:02}.png").write_bytes(image_bytes(seed, size=(120, 120)))  # ~43 KB
    total = 2 * 60

    def captioned() -> int:
        return sum(1 for folder in folders.values() for _ in folder.glob("*.txt"))

    admin, log_path = tmp_path / "admin.sock", tmp_path / "haproxy.log"
    proxy: subprocess.Popen[bytes] | None = None
    runs: dict[str, subprocess.Popen[str]] = {}
    try:
        urls = [d.wait_listening() for d in daemons]
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        backends = [u.split("//")[1] for u in urls]
        config.write_text(adapt_config(CONFIG.read_text(), front, backends, admin_socket=admin))
        assert HAPROXY is not None
        master_worker = [HAPROXY, "-W", "-db", "-f", str(config)]  # as haproxy.service runs it
        with log_path.open("wb") as proxy_log:
            proxy = subprocess.Popen(master_worker, stdout=proxy_log, stderr=proxy_log)
        front_url = f"http://127.0.0.1:{front}"
        end = time.monotonic() + 15
        while http_status(front_url + "/ready") != 200:
            assert proxy.poll() is None and time.monotonic() < end, log_path.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # both servers pass their first checks
        runs = folder_runs(front_url, folders)

        wait_until(lambda: captioned() >= 0.15 * total, runs, "the drain")
        runtime_api(admin, DRAIN.group(1))
        wait_until(lambda: captioned() >= 0.3 * total, runs, "the end of the drain")
        runtime_api(admin, DRAIN.group(1).replace("state drain", "state ready"))

        wait_until(lambda: captioned() >= 0.4 * total, runs, "the kill")
        # With work in it, for certain: paused, it keeps what HAProxy sends it until the kill (a
        # snapshot of its status could catch it between batches, holding nothing).
        daemons[1].send(signal.SIGSTOP)
        wait_until(lambda: _sessions_on(admin, "gpu2") > 0, runs, "a request held by the paused gpu2")
        daemons[1].process.kill()
        daemons[1].wait(10)
        time.sleep(1)
        daemons[1].close()
        daemons[1] = daemon("gpu2-again", ports[1])
        daemons[1].wait_listening()

        wait_until(lambda: captioned() >= 0.6 * total, runs, "the reload")
        proxy.send_signal(signal.SIGUSR2)
        outcomes = {name: run.communicate(timeout=180) for name, run in runs.items()}
        reruns = {name: run.communicate(timeout=60) for name, run in folder_runs(front_url, folders).items()}

        # What docs/operations/haproxy.md says: a reload forgets a drain made through the runtime API.
        runtime_api(admin, DRAIN.group(1))
        before = runtime_api(admin, "show servers state vision")
        proxy.send_signal(signal.SIGUSR2)
        end = time.monotonic() + 15
        while log_path.read_text(errors="replace").count("Former worker") < 2:  # the second reload's
            assert time.monotonic() < end, log_path.read_text()
            time.sleep(0.1)
        after = runtime_api(admin, "show servers state vision")
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.communicate()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for d in daemons:
            d.close()
    log = log_path.read_text(errors="replace")
    assert "vision/gpu1 enters drain state" in log and "vision/gpu1 is UP (leaving forced drain)" in log
    assert "vision/gpu2 is DOWN" in log and "Reloading HAProxy" in log
    summaries = {
        "python": "60 captioned, 0 skipped, 0 failed of 60 images",
        "bash": "60 image(s) found: 60 captioned, 0 skipped (caption exists), 0 failed",
    }
    for name, (_, stderr) in outcomes.items():
        assert runs[name].returncode == 0, stderr[-3000:]
        assert summaries[name] in stderr, stderr[-3000:]
    for folder in folders.values():
        captions = [image.with_suffix(".txt").read_text(encoding="utf-8") for image in folder.glob("*.png")]
        assert len(captions) == 60 and all(captions), folder
        others = sorted(path.name for path in folder.iterdir() if path.suffix != ".png")
        assert others == [f"img{seed:02}.txt" for seed in range(60)]  # no temporary file left
    rerun_summaries = {
        "python": "0 captioned, 60 skipped, 0 failed of 60 images",
        "bash": "60 image(s) found: 0 captioned, 60 skipped (caption exists), 0 failed",
    }
    for name, (_, stderr) in reruns.items():
        assert rerun_summaries[name] in stderr, stderr[-3000:]
    drained = [line.split()[6] for line in before.splitlines() if " gpu1 " in line]
    reloaded = [line.split()[6] for line in after.splitlines() if " gpu1 " in line]
    assert (drained, reloaded) == (["8"], ["0"]), (before, after)  # srv_admin_state 8: drain
