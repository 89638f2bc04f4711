"""A disk that is full: the one write error that stops a folder run instead of failing each image.

A caption file that cannot be written because of its own trouble (read-only, a folder in its
place) fails that image alone. No space left on the disk, an exhausted quota or a file that may
grow no more (``EFBIG``: a size limit of the process or the file system) is met by every image
after it too: a run that went on would print the same failure thousands of times overnight and
caption every image for nothing. So the folder captioners stop at the first one, say which file
could not be written and why, and a rerun after freeing space resumes from what was written.
Standard library only: the client uses it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NoReturn

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFull(OSError):
    """No more bytes could be written to ``path``: its file system is full (or a quota or size
    limit is reached). Raised in place of the ``OSError`` so the message names the file we were
    writing, not a hidden temporary file, and in words a user searches for."""

    def __init__(self, path: Path | str, cause: OSError, note: str = "") -> None:
        super().__init__(cause.errno, cause.strerror or os.strerror(cause.errno or errno.ENOSPC), str(path))
        self.note = note  # what became of the data that was to be written, when it is kept

    def __str__(self) -> str:
        reason = no_space_reason(self)
        return f"cannot write {self.filename}: {reason}" + (f"; {self.note}" if self.note else "")


def no_space_reason(exc: OSError) -> str:
    """Why a full-disk error had no room, in the words every tool uses for it."""
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded: no space left for this user"
    if exc.errno == errno.EFBIG:
        return "file too large: no space left within the size limit"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return str(exc.strerror or exc)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the disk (or quota, or file size limit) has no room for more."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def as_disk_full(path: Path | str, exc: BaseException) -> BaseException:
    """``exc`` as the error to raise for a write of ``path``: a :class:`DiskFull` naming ``path``
    when the disk is full, else ``exc`` itself."""
    if is_disk_full(exc) and not isinstance(exc, DiskFull):
        assert isinstance(exc, OSError)
        return DiskFull(path, exc)
    return exc


def raise_as_disk_full(path: Path | str, exc: BaseException) -> NoReturn:
    """Raise ``exc`` (caught while writing ``path``), as a :class:`DiskFull` naming ``path``
    (not a hidden temporary file) when the disk is full."""
    named = as_disk_full(path, exc)
    if named is exc:
        raise exc
    raise named from exc


RERUN_ADVICE = "free some space, then run the same command again: it resumes where this run stopped"
