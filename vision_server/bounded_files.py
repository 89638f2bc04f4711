"""Read a local file only when it fits a byte limit, without ever holding more than the limit.

A dataset folder can hold anything under an image's name: a multi-gigabyte video renamed
``.png``, a disk image, a file that another program is still appending to. Its size is checked
before any byte is read (``stat``), and the read itself stops one byte past the limit, so a file
that grew after the check is refused as well, never read whole.
"""

from __future__ import annotations

import stat
from pathlib import Path

from vision_server.byte_sizes import format_byte_size
from vision_server.errors import PayloadTooLarge


def read_at_most(path: Path, limit: int, setting: str) -> bytes:
    """``path``'s bytes; :class:`PayloadTooLarge` (naming ``setting``, the flag that sets
    ``limit``) when it holds more. Raises :class:`OSError` as ``open`` does (a missing file, no
    permission), also for something that is not a regular file (a FIFO would block the read)."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError("not a regular file")
    bound = f"the {format_byte_size(limit)} an image may be ({setting})"
    if info.st_size > limit:
        size = format_byte_size(info.st_size)
        if size == format_byte_size(limit):  # just over: rounding would show the same number
            size, bound = f"{info.st_size} bytes", f"the {limit} bytes an image may be ({setting})"
        raise PayloadTooLarge(f"the file is {size}, over {bound}")
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the file grew over {bound} while it was read")
    return data
