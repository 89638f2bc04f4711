"""Log lines that quote bytes a client sent which are not UTF-8 reach ``--log-file`` too.

aiohttp hands such header bytes to Python as lone surrogates (``\\udcff``). The log file was
opened for strict UTF-8, so a line quoting one (a refused ``Host``, a refused page's preflight)
was dropped from the file, with a "--- Logging error ---" traceback on stderr instead: a client
could keep its refused requests out of the log. A real server process, a real log file.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.support.api import tiny_cache_dir
from tests.support.processes import tiny_server

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX server process")


def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def test_a_refused_host_of_bytes_that_are_not_utf8_is_logged_to_the_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_file = tmp_path / "logs" / "server.log"
    with tiny_server(tmp_path, tiny_cache_dir(tmp_path_factory), "--log-file", str(log_file)) as server:
        url = server.wait_listening(timeout=120)
        reply = raw_request(url, b"GET /v1/status HTTP/1.1\r\nHost: ev\xffil\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
        reply = raw_request(url, b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]  # logged after the refusal
        server.stop()
        stderr = server.log_text()
    written = log_file.read_text(encoding="utf-8")
    assert "Logging error" not in stderr and "UnicodeEncodeError" not in stderr, stderr[-3000:]
    refusals = [line for line in written.splitlines() if "Refused a request for host" in line]
    assert len(refusals) == 1 and "ev\\udcffil" in refusals[0], written[-3000:]
    assert "GET /v1/status 200" in written
