"""Replacing a file all at once: write a temporary file beside it, flush it, rename it over.

A reader (a trainer, a skip-existing rerun, the server) then sees the old file or the whole new
one, never half of it. One rule for every file we rewrite in place (caption files, the Parquet
fold, ``training.json``, cached thumbnails), so none can forget the flush or the clean-up.
Standard library only: the client writes caption files with it.

The caller names the temporary file: each kind has its own name pattern, the one its sweep of
crash leftovers looks for (``captionfiles.temp_path``, ``outputs.fold_temp_path``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, temp: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield ``temp`` for the body to write; then flush it to the disk (with ``durable``) and
    rename it over ``path``. On any error, the body's included (Ctrl+C too), ``temp`` is deleted
    and ``path`` left as it was. Only a hard kill between the two steps leaves ``temp`` behind.

    ``durable=False`` skips the flush, for a cache whose loss only costs time.
    """
    try:
        yield temp
        if durable:
            _flush(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def create_whole(path: Path, temp: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` all at once unless a file is there; whether it did.

    Written to ``temp``, flushed, and published with a hard link, which fails where a file
    exists, so one that appears at the same moment (another process's) is never replaced: a
    look before a rename leaves a gap between the two. ``temp`` is gone afterwards. Raises
    ``OSError`` where the file system has no hard links (FAT, some network shares)."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _flush(temp)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        return True
    finally:
        temp.unlink(missing_ok=True)


def _flush(path: Path) -> None:
    """Force ``path``'s written bytes to the disk before the rename publishes them (else a power
    loss may leave the new name pointing at an empty file). Opened for writing, which
    ``fsync`` needs on Windows."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
