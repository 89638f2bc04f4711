"""Client-named paths inside the gallery root, and nothing else.

A client names an image by its path relative to the root, with ``/`` between folders. Anything
that could step outside (``..``, an absolute or drive path, a backslash, a NUL) is refused as
text before the file system is asked; whatever passes is resolved (symlinks followed) and must
still lie under the resolved root. Callers answer every refusal with the same 404 as a missing
file, so a client learns nothing about what exists outside.

A name that is not UTF-8 (a dataset unpacked from an old archive: Latin-1 bytes) reaches Python
with lone surrogates, which a browser cannot put in a URL. So each listed image also has a
URL form, :func:`url_form`: its raw bytes percent-encoded (``/`` kept, and ``!'()*`` escaped,
so not letter for letter what a browser's ``encodeURIComponent`` writes for a UTF-8 name, but
the same name once decoded); :func:`from_url_form` reads either back.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

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


def beside(key: str, name: str) -> str:
    """The key of the file ``name`` in the folder of the image ``key`` (its caption file, an
    image it shares one with): messages name every file relative to the root, as the image."""
    return posixpath.join(posixpath.dirname(key), name)


def url_form(key: str) -> str:
    """``key`` as a query value: its bytes on disk (``os.fsencode``) percent-encoded, ``/`` kept."""
    return quote(os.fsencode(key), safe="/")


def from_url_form(value: str) -> str | None:
    """The key a raw (still percent-encoded) query value names, ``+`` read as a space as in any
    query; None for bytes this system cannot have in a name (a Windows name is always Unicode)."""
    try:
        return os.fsdecode(unquote_to_bytes(value.replace("+", " ")))
    except UnicodeDecodeError:
        return None


def raw_query_value(raw_query: str, name: str) -> str | None:
    """The first ``name=`` value of a query string, still percent-encoded: decoded by a web
    framework as UTF-8, a Latin-1 byte would already be U+FFFD, and the image lost."""
    for pair in raw_query.split("&"):
        key, _, value = pair.partition("=")
        if from_url_form(key) == name:
            return value
    return None
