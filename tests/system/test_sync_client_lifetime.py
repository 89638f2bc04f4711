"""A ``VisionClient`` that is never closed, as notebooks and short scripts leave it, against the
real ``vision-server`` (tiny model): it closes itself, with no warnings on stderr and no thread
left behind."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.images import save_flat
from vision_server.client import VisionClient

DROPPED = """
import sys
from vision_server.client import VisionClient

client = VisionClient(sys.argv[1])  # never closed: the script just ends
print(client.caption(sys.argv[2], "CAPTION"))
dropped = VisionClient(sys.argv[1])
print(dropped.model())
del dropped
"""


def test_a_script_that_never_closes_its_client_ends_without_unclosed_session_warnings(
    tiny_server_url: str, tmp_path: Path
) -> None:
    image = save_flat(tmp_path / "photo.png")
    done = subprocess.run(
        [sys.executable, "-c", DROPPED, tiny_server_url, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    caption, model = done.stdout.splitlines()
    assert caption and model
    # aiohttp's words for a session nobody closed ("Unclosed client session", "Unclosed connector").
    assert "Unclosed" not in done.stderr, done.stderr


def test_a_dropped_client_stops_its_thread(tiny_server_url: str) -> None:
    before = {thread for thread in threading.enumerate() if thread.name == "vision-client"}
    client = VisionClient(tiny_server_url)
    assert client.model()
    (ours,) = {thread for thread in threading.enumerate() if thread.name == "vision-client"} - before
    del client
    gc.collect()
    ours.join(timeout=30)
    assert not ours.is_alive()
