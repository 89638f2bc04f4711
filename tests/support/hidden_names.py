"""A dataset folder with hidden files and folders among its images: what Jupyter, file managers,
the desktop trash and macOS leave in a real one. Every dataset tool lists only ``VISIBLE`` of it.

Each hidden entry is a real, decodable image, so a tool that takes one captions it and writes
a caption file for it: nothing about the files themselves tells the two kinds apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.images import save

VISIBLE = ("a.png", "sub/b.png")
HIDDEN_IMAGES = (
    ".hidden.jpg",
    "._a.png",  # a macOS resource fork
    ".ipynb_checkpoints/a-checkpoint.png",
    "sub/.thumbnails/b-thumb.png",
    ".cache/deep/c.png",
    ".Trash-1000/files/d.png",
)
HIDDEN_LINKS = (".link.png", "sub/.linked")  # a dot-named symlink to an image, and to a folder


def make_tree(root: Path) -> Path:
    """``root`` with the images of ``VISIBLE`` and ``HIDDEN_IMAGES`` and the ``HIDDEN_LINKS``."""
    for seed, name in enumerate((*VISIBLE, *HIDDEN_IMAGES)):
        save(root / name, seed)
    os.symlink("a.png", root / ".link.png")
    os.symlink(".thumbnails", root / "sub" / ".linked")
    return root


def files_below(root: Path) -> set[str]:
    """Every file and symlink below ``root``, ``/``-separated: what a run may have added."""
    found = set()
    for folder, dirs, names in os.walk(root):
        for name in (*names, *(d for d in dirs if os.path.islink(os.path.join(folder, d)))):
            found.add(Path(folder, name).relative_to(root).as_posix())
    return found
