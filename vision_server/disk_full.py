"""A disk that is full: the one write error that stops a folder run instead of failing each image.

A caption file that cannot be written because of its own trouble (read-only, a folder in its
place) fails that image alone. No space left on the disk, an exhausted quota or a file that may
grow no more (``EFBIG``: a size limit of the process or the file system) is met by every image
after it too: a run that went on would print the same failure thousands of times overnight and
caption every image for nothing. So the folder captioners stop at the first one, say which file
could not be written and why, and a rerun after freeing space resumes from what was written.
A library written in Rust (safetensors, which writes ``train``'s checkpoints) raises its own
error with the errno only in its text: :func:`is_disk_full` reads it there too, so every caller
knows it. Standard library only: the client uses it.
"""

from __future__ import annotations

import errno
import os
import re
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


# Rust's I/O errors end their text with the errno, "No space left on device (os error 28)";
# libraries written in Rust (safetensors) raise them as their own exception, not an OSError.
# Only those libraries' errors are read: any other text (a server's message relayed by the
# client) may quote such words without our disk being full.
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")
_RUST_LIBRARIES = ("safetensors",)


def _from_rust_library(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _RUST_LIBRARIES


def _no_space_errno(exc: BaseException | None) -> int | None:
    """The errno by which ``exc`` says there is no room (one of :data:`NO_SPACE_ERRNOS`), read
    from an ``OSError`` or from the text of a Rust library's error; None for any other error."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno if exc.errno in NO_SPACE_ERRNOS else None
    if exc is None or not _from_rust_library(exc):
        return None
    found = _RUST_ERRNO.search(str(exc))
    number = int(found.group(1)) if found else None
    return number if number in NO_SPACE_ERRNOS else None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the disk (or quota, or file size limit) has no room for more: an
    ``OSError``, or a Rust library's error that carries the same errno in its text."""
    return _no_space_errno(exc) is not None


def as_disk_full(path: Path | str, exc: BaseException) -> BaseException:
    """``exc`` as the error to raise for a write of ``path``: a :class:`DiskFull` naming ``path``
    when the disk is full, else ``exc`` itself."""
    number = _no_space_errno(exc)
    if number is None or isinstance(exc, DiskFull):
        return exc
    cause = exc if isinstance(exc, OSError) else OSError(number, os.strerror(number))
    return DiskFull(path, cause)


def raise_as_disk_full(path: Path | str, exc: BaseException) -> NoReturn:
    """Raise ``exc`` (caught while writing ``path``), as a :class:`DiskFull` naming ``path``
    (not a hidden temporary file) when the disk is full."""
    named = as_disk_full(path, exc)
    if named is exc:
        raise exc
    raise named from exc


RERUN_ADVICE = "free some space, then run the same command again: it resumes where this run stopped"
