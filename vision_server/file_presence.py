"""Whether many paths name existing files, answered a folder at a time.

Asking the file system once per path costs one ``stat`` each: a million paths into a folder
that moved away take seconds before anyone can say "none of these exist". A folder answers
for everything in it instead. One that does not exist holds no files (one look for all its
paths), and an existing folder where paths keep missing is listed once, after which a name
that is not in the listing needs no look of its own.

The listing can only say "absent", never "present" on its own: a name whose folded form
(case, Unicode form, trailing dots and spaces, as case-insensitive and Windows file systems
fold them) is in the listing is still looked up itself, and so is every name a listing cannot
judge: ``..``, a Windows short name with ``~``, and a name with ``:`` (on Windows a
drive-relative path such as ``C:cat.png``, or an NTFS stream such as
``cat.png:Zone.Identifier``). So :meth:`FilePresence.exists` answers what
:func:`os.path.exists` would, only with fewer looks.
"""

from __future__ import annotations

import os
import unicodedata

LIST_AFTER = 32  # misses in one existing folder before it is listed once
LIST_AT_MOST = 200_000  # a larger folder is not held in memory: its paths are looked up one by one


class FilePresence:
    """Answers :func:`os.path.exists` for many paths, remembering what each folder showed."""

    def __init__(self) -> None:
        self._missing: set[str] = set()  # folders that do not exist (or are not folders)
        self._misses: dict[str, int] = {}  # existing folder -> paths in it found missing
        self._listed: dict[str, frozenset[str] | None] = {}  # folder -> folded names; None: too many

    def exists(self, path: str) -> bool:
        """Whether ``path`` names something that exists, as :func:`os.path.exists` says."""
        folder, name = _split(path)
        if not name or "~" in name or ":" in name or name in (os.curdir, os.pardir):
            return os.path.exists(path)  # a name no listing can rule out
        if folder in self._missing:
            return False
        names = self._listed.get(folder)
        if names is not None and _fold(name) not in names:
            return False
        if os.path.exists(path):
            return True
        if folder not in self._listed:
            self._note_miss(folder)
        return False

    def _note_miss(self, folder: str) -> None:
        """One more path in ``folder`` was missing: learn whether the folder is there, and
        list it once enough of its paths have missed."""
        count = self._misses.get(folder, 0)
        if count == 0 and not os.path.isdir(folder):
            self._missing.add(folder)
            return
        self._misses[folder] = count + 1
        if count + 1 >= LIST_AFTER:
            self._listed[folder] = _listing(folder)


def _split(path: str) -> tuple[str, str]:
    """``path``'s folder and last name, as :func:`os.path.split` gives them for the paths
    asked here, at a fraction of its cost (it runs once per path)."""
    cut = path.rfind(os.sep)
    if os.altsep:
        cut = max(cut, path.rfind(os.altsep))
    if cut < 0:
        return os.curdir, path
    folder = path[:cut]
    if not folder.strip("/\\") or folder.endswith(":"):
        folder = path[: cut + 1]  # a root ("/", "C:\\") keeps its separator
    return folder, path[cut + 1 :]


def _fold(name: str) -> str:
    """``name`` as a case-insensitive, normalising file system would compare it."""
    if not name.isascii():
        name = unicodedata.normalize("NFC", name)
    return name.casefold().rstrip(" .")


def _listing(folder: str) -> frozenset[str] | None:
    """The folded names in ``folder``; None when it cannot be read or holds too many."""
    names: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                names.add(_fold(entry.name))
                if len(names) > LIST_AT_MOST:
                    return None
    except OSError:
        return None
    return frozenset(names)
