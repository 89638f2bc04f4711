"""Append-only line files (JSON Lines outputs, the Parquet journal): each line whole or not at all.

A line is one ``write`` of its own, straight to the file (no buffer that could hold half of it
for later). When the write fails part-way (the disk filled up, Ctrl+C) the file is cut back to
where the line began, so a reader, a resuming rerun and the next line never meet half a row.
Only a hard kill in the middle of a write can leave a torn last line: a log opened again ends it
with a newline before its first line, and readers skip lines that do not parse.
Standard library only: the client writes its JSONL file with it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vision_server.disk_full import raise_as_disk_full


class LineLog:
    """Lines appended to ``path``, opened (and created) with the first line or :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        """Open the file for appending (created if missing), ending a torn last line first."""
        if self._fd is not None:
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise_as_disk_full(self.path, exc)
        self._fd = fd
        try:
            if os.fstat(fd).st_size > 0 and not _ends_with_newline(self.path):
                self._write_whole(b"\n")
        except BaseException:
            self.close()
            raise

    def append(self, line: str) -> None:
        """Write ``line`` (ending with a newline) in one piece, or not at all."""
        self.open()
        self._write_whole(line.encode("utf-8"))

    def _write_whole(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        start = os.fstat(fd).st_size  # the one writer (the output lock): the line begins there
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # freeing blocks needs no free space
            raise_as_disk_full(self.path, exc)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
