"""When a file the gallery keeps in memory must be read again: its stamp changed.

Size and mtime alone missed a new file of the same size whose mtime came out the same: the mtime
moves once per clock tick on many kernels (a jiffy, 1 to 10 ms), and an archive or a copy that
keeps times (``tar x``, ``cp -p``, ``rsync -t``) gives a new caption file the time its old one
had. The inode tells such a file apart: every tool here writes a new file and renames it over
the old one, and so do most editors and extractors. (A rewrite in place, of the same size, in
the same tick, still looks unchanged: only reading the file would tell.)
"""

from __future__ import annotations

import os

FileStamp = tuple[int, int, int, int]


def file_stamp(info: os.stat_result) -> FileStamp:
    """Device, inode, size and mtime (ns) of ``info``: equal stamps mean the same content."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
