"""Real server processes for tests: start, find the port they bound, signal, and read their log.

``tiny_server`` is the one way tests start ``vision-server serve --model test:tiny``; the shared
``tiny_server_url`` fixture (conftest) and every module that needs its own options go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAKE_SERVER = Path(__file__).with_name("fake_server.py")
_LISTENING = re.compile(r"listening on (https?://[\w.:\[\]-]+)")


def server_env(tmp_path: Path, **settings: object) -> dict[str, str]:
    """The environment of a test server: settings as VISION_SERVER_* and no user config file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env.pop("NOTIFY_SOCKET", None)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({"VISION_SERVER_HOST": "127.0.0.1", "VISION_SERVER_PORT": "0"})
    env.update({f"VISION_SERVER_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def free_port() -> int:
    """A TCP port nothing listens on right now (for "the server is down" cases)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, body: object = None, timeout: float = 60) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) with the standard library: the status and the decoded reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def cli_command() -> list[str]:
    """The installed ``vision-server`` script of this interpreter's environment."""
    script = Path(sys.executable).with_name("vision-server")
    found = str(script) if script.exists() else shutil.which("vision-server")
    return [found] if found else [sys.executable, "-m", "vision_server"]


class ServerProcess:
    """One server process whose stdout and stderr go to a file (no pipe can fill up and block it)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    def fake(
        cls, tmp_path: Path, name: str, *, delay: float, env: dict[str, str] | None = None, **settings: object
    ) -> ServerProcess:
        """``tests/fake_server.py``: the real server process with a fake captioner of ``delay`` s."""
        full_env = server_env(tmp_path, **settings)
        full_env["FAKE_DELAY"] = str(delay)
        full_env.update(env or {})
        return cls([sys.executable, str(FAKE_SERVER)], full_env, tmp_path / f"{name}.log")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, timeout: float = 60.0) -> str:
        """The base URL the server bound, once its log says it listens."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = _LISTENING.search(self.log_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise AssertionError(f"server not listening after {timeout}s:\n{self.log_text()}")

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then wait for the drain (the process is killed by ``close`` if it hangs)."""
        self.send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout)

    def close(self) -> None:
        """Kill this one process if a test left it running, and close its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tiny_server(
    tmp_path: Path,
    cache_dir: Path,
    *options: str,
    name: str = "server",
    env: dict[str, str] | None = None,
    **settings: object,
) -> ServerProcess:
    """``vision-server serve --model test:tiny`` with ``options`` (their own ``--model`` instead,
    if any), preloaded, never idling out.

    ``cache_dir`` is where the tiny model is built (once per test run when every caller passes the
    same one: ``tests.support.api.tiny_cache_dir``); ``settings`` become ``VISION_SERVER_*``
    variables and ``env`` adds other variables (``OMP_NUM_THREADS`` on a crowded machine).
    """
    # --model repeats (several models): one in ``options`` replaces test:tiny rather than adding to it.
    chosen = any(option == "--model" or option.startswith("--model=") for option in options)
    model = () if chosen else ("--model", "test:tiny")
    command = [*cli_command(), "serve", *model, "--cache-dir", str(cache_dir)]
    command += ["--preload", "--idle-timeout", "-1", *options]
    full_env = server_env(tmp_path, **settings)
    full_env.update(env or {})
    return ServerProcess(command, full_env, tmp_path / f"{name}.log")


def run_across_a_restart(
    tmp_path: Path,
    command: Callable[[str], list[str]],
    env: dict[str, str],
    wrote: Callable[[], bool],
    *,
    delay: float,
    down: float,
    **settings: Any,
) -> tuple[int, str]:
    """Run ``command(url)`` against a fake server (``settings`` must name its ``port``), SIGKILL
    the server once ``wrote()`` says the run has written something (as the OOM killer or a crash
    would: requests are in flight), keep it down ``down`` seconds, start it again on the same
    port and let the run end: its exit status and stderr. The folder tools must outlive it."""
    run: subprocess.Popen[str] | None = None
    try:
        with ServerProcess.fake(tmp_path, "first", delay=delay, **settings) as first:
            url = first.wait_listening()
            run = subprocess.Popen(
                command(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            end = time.monotonic() + 60
            while not wrote() and time.monotonic() < end and run.poll() is None:
                time.sleep(0.05)
            first.process.kill()
            first.wait(10)
        assert run.poll() is None, "the run ended before the server went away"
        time.sleep(down)
        with ServerProcess.fake(tmp_path, "second", delay=delay, **settings) as second:
            assert second.wait_listening() == url
            _, stderr = run.communicate(timeout=120)
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.communicate()
    return run.returncode, stderr
