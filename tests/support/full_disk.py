"""A real full disk for tests: a small tmpfs mounted for the test, filled up to a chosen margin
(or a small ext2 file system on a loop device, for a rename that needs room: tmpfs has none to
refuse).

Writes there fail as on a full dataset drive (``ENOSPC`` from the kernel, a short write first
when a write crosses into a page that cannot be had), so the folder captioners meet the fault
itself, not a stand-in. Mounting needs root (CAP_SYS_ADMIN): the CI machine runs the tests as
root in its container; elsewhere the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
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


@contextlib.contextmanager
def small_ext2_disk(folder: Path, size: str = "2m") -> Iterator[Path]:
    """``folder`` (created) as the mount point of an ext2 file system of ``size`` in 1 KiB blocks,
    kept in a file beside it and mounted through a loop device; unmounted afterwards.

    For what tmpfs never refuses: a directory there takes no blocks, so a rename into a new name
    cannot fail for want of space. On ext2 a directory whose blocks are full must take one more
    for a new name, and on a full disk the rename fails with ``ENOSPC``. Skipped without root,
    ``mkfs.ext2`` or a loop device."""
    image = folder.with_name(folder.name + ".ext2")
    if shutil.which("mkfs.ext2") is None:
        pytest.skip("cannot make an ext2 file system to fill up: no mkfs.ext2")
    made = subprocess.run(
        ["mkfs.ext2", "-q", "-F", "-b", "1024", "-m", "0", "-N", "1024", str(image), size],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext2 file system to fill up: {made.stderr.strip()}")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(folder)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount an ext2 image (needs root and a loop device): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        image.unlink(missing_ok=True)


def fill_exactly(folder: Path) -> Path:
    """Take every free block of ``folder``'s file system, one 1 KiB write at a time (``fill``
    writes whole pages, and may leave up to three blocks of 1 KiB free); ``filler`` holds them."""
    filler = folder / "filler"
    with filler.open("ab", buffering=0) as handle:
        while True:
            try:
                handle.write(b"\0" * 1024)
            except OSError:
                break
    return filler


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


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Files of this process may not grow past ``size`` bytes while the block runs: the kernel
    cuts a write short at the limit and refuses the next one (``EFBIG``; Python ignores the
    SIGXFSZ that comes with it), as a full disk does at its last free block. No root needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
