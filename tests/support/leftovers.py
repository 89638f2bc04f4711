"""Files a killed run leaves behind, made on purpose with a chosen age (the sweep goes by mtime)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vision_server.captionfiles import STALE_TEMP_AGE

OLD = STALE_TEMP_AGE + 60  # a crash's leftover: the sweep removes it
YOUNG = STALE_TEMP_AGE - 60  # may be another run's write in progress: the sweep keeps it


def aged(path: Path, seconds: float, data: bytes = b"half a cap") -> Path:
    """``path`` with ``data``, its mtime ``seconds`` in the past."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def caption_temp(folder: Path, hex16: str, seconds: float) -> Path:
    """A temp caption file as ``captionfiles.temp_path`` names them, ``seconds`` old."""
    return aged(folder / f".vision-caption.{hex16}.tmp", seconds)
