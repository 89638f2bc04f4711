"""Serve the real application with the fake captioner through ``vision_server.server.serve``.

Subprocess tests use it where jobs must take a known time (drain on SIGTERM, HAProxy failover):
the process, signals, sockets and shutdown are the real ones, only generation is simulated.
Settings come from ``VISION_SERVER_*`` variables; ``FAKE_DELAY`` is the seconds per batch.
"""

from __future__ import annotations

import os

from vision_server.server import serve
from vision_server.settings import load_settings
from vision_server.testing.fake import FakeCaptioner

if __name__ == "__main__":
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    serve(load_settings(environ=os.environ), FakeCaptioner(delay=delay, model_id="fake-model"))
