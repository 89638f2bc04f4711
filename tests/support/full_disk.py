"""A real full disk for tests: a small tmpfs mounted for the test, filled up to a chosen margin.

Writes there fail as on a full dataset drive (``ENOSPC`` from the kernel, a short write first
when a write crosses into a page that cannot be had), so the folder captioners meet the fault
itself, not a stand-in. Mounting needs root (CAP_SYS_ADMIN): the CI machine runs the tests as
root in its container; elsewhere the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE = 4096  # tmpfs hands out whole pages: a caption file of a few bytes takes one


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    """``folder`` (created) as the mount point of a tmpfs of ``size``, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def free_bytes(folder: Path) -> int:
    info = os.statvfs(folder)
    return info.f_bavail * info.f_frsize


def fill(folder: Path, leave: int = 0) -> Path:
    """Take the free space of ``folder``'s file system until ``leave`` bytes or fewer are left,
    with one file, ``filler``; delete it to free the space again."""
    filler = folder / "filler"
    with filler.open("ab") as handle:
        while free_bytes(folder) > leave:
            try:
                handle.write(b"\0" * PAGE)
                handle.flush()
            except OSError:
                break
    return filler
