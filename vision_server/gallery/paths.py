"""Client-named paths inside the gallery root, and nothing else.

A client names an image by its path relative to the root, with ``/`` between folders. Anything
that could step outside (``..``, an absolute or drive path, a backslash, a NUL) is refused as
text before the file system is asked; whatever passes is resolved (symlinks followed) and must
still lie under the resolved root. Callers answer every refusal with the same 404 as a missing
file, so a client learns nothing about what exists outside.
"""

from __future__ import annotations

import re
from pathlib import Path

_DRIVE = re.compile(r"^[A-Za-z]:")


def is_clean_relative(text: str) -> bool:
    """True for ``a/b.png``-style paths: relative, no empty, ``.`` or ``..`` part, no ``\\`` or NUL."""
    if not text or "\x00" in text or "\\" in text or text.startswith("/") or _DRIVE.match(text):
        return False
    return all(part not in ("", ".", "..") for part in text.split("/"))


def is_under(path: Path, real_root: Path) -> bool:
    """Whether ``path``, every symlink followed, exists and lies under ``real_root`` (already resolved)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, unreadable
        return False
    return real == real_root or real.is_relative_to(real_root)
