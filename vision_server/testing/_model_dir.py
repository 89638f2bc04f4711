"""Where a test model is written: a new or empty directory whose files end up readable by all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def new_model_dir(out_dir: str | Path) -> Iterator[Path]:
    """Refuse a directory that already holds files (a new model must not mix with an old one);
    once the builder is done, make every file world-readable (safetensors writes 0600), as a
    downloaded model is."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory for the test model")
    out.mkdir(parents=True, exist_ok=True)
    yield out
    make_readable(out)


def make_readable(out: Path) -> None:
    """Every file under ``out`` 0644, so a shared cache of test models stays usable by every user."""
    for path in out.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """A one-file save needs no "Writing model shards" bar on stderr."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
