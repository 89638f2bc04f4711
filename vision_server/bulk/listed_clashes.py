"""Images of path lists (and Parquet path columns, image-file inputs) that would share a caption file.

A folder reader sees each folder's names at once and flags ``a.jpg`` beside ``a.png`` itself.
A ``.txt``/``.jsonl`` list can name the two images anywhere (lines apart, in two lists, spelled
``a.jpg`` and ``./sub/../a.png``), and the first one's caption would be captioned and written
before the second is read. So the lists are read once ahead of the run, which must work for a
list of ten million lines without holding ten million paths:

1. Every entry becomes one 64-bit number: a 32-bit hash of where its caption file goes (the
   entry's folder, symlinks resolved, and its stem) beside a 32-bit hash of its file name. They
   sit in one packed array (8 bytes an entry: 80 MB for ten million lines; ``np.unique`` sorts a
   copy), deduplicated, and the caption places that still occur twice are the candidates. An
   image listed twice (the same name) is one entry after deduplication, so a list concatenated
   with itself yields no candidates.
   The stem is hashed case-folded, so ``b.jpg`` and ``B.png`` are candidates too: where the
   folder's file system folds case (macOS, Windows, a Samba share), ``b.txt`` and ``B.txt``
   are one file.
2. Only when there are candidates is the list read again, and the entries whose caption place
   is a candidate kept exactly (folder, stem, names); a hash that matched by chance is dropped
   here, and so is a pair of stems that differ in case on a file system that keeps case apart
   (each candidate folder's file system is asked once: :class:`~vision_server.captionfiles.CaseRules`).
   Where it folds case, names are compared folded too: ``b.jpg`` and ``B.JPG`` are one image.
   That map holds the clashing images only.

What is left out: an image whose name hashes like another of the same stem in the same folder
(one chance in 2**32 per such pair) is taken for the same image; and a list is not compared
with the folders given in the same run (each folder is checked within itself).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from vision_server.bulk.records import safe_text
from vision_server.captionfiles import CaseRules, same_file_key

Place = tuple[str, str]  # (the image's folder with symlinks resolved, the image's stem)
_LOW = 0xFFFFFFFF


class ListedClashes:
    """The images among listed entries that share a caption place, and what each clashes with."""

    def __init__(self, clashes: dict[Place, dict[str, str]], folds: dict[str, bool] | None = None) -> None:
        self._clashes = clashes  # place (stem folded where the folder folds case) -> {name: as listed}
        self._folds = folds or {}  # the clashing places' folders: does their file system fold case
        self._place = _place_finder()

    def __len__(self) -> int:
        return len(self._clashes)

    def others(self, path: Path) -> tuple[str, ...]:
        """The other images (as listed) whose caption file would be ``path``'s."""
        if not self._clashes:
            return ()
        folder, name = self._place(str(path))
        folds = self._folds.get(folder)
        if folds is None:
            return ()
        name = same_file_key(name, folds)
        names = self._clashes.get((folder, same_file_key(_stem(name), folds)))
        if names is None:
            return ()
        return tuple(safe_text(listed) for other, listed in names.items() if other != name)


def find_clashes(
    entries: Callable[[], Iterable[tuple[str, str]]], case: CaseRules | None = None
) -> ListedClashes:
    """Read ``entries()`` (each ``(as listed, its path)``) once, and again only for candidates;
    ``case`` tells whether a candidate folder's file system folds case (default: ask it)."""
    import numpy as np

    case = case or CaseRules()
    place = _place_finder()
    packed = array("Q")
    for _listed, path in entries():
        folder, name = place(path)
        packed.append(((hash((folder, _stem(name).casefold())) & _LOW) << 32) | (hash(name) & _LOW))
    if len(packed) < 2:
        return ListedClashes({})
    unique = np.unique(np.frombuffer(packed, dtype=np.uint64))
    del packed
    places = unique >> np.uint64(32)
    candidates = set(places[1:][places[1:] == places[:-1]].tolist())
    del unique, places
    if not candidates:
        return ListedClashes({})
    exact: dict[Place, dict[str, str]] = {}
    folds: dict[str, bool] = {}
    for listed, path in entries():
        folder, name = place(path)
        stem = _stem(name)
        if hash((folder, stem.casefold())) & _LOW not in candidates:
            continue
        if folder not in folds:
            folds[folder] = case.folds(Path(folder))
        where = (folder, same_file_key(stem, folds[folder]))
        exact.setdefault(where, {}).setdefault(same_file_key(name, folds[folder]), listed)
    clashing = {where: names for where, names in exact.items() if len(names) > 1}
    return ListedClashes(clashing, {folder: folds[folder] for folder, _stem in clashing})


def _stem(name: str) -> str:
    """``Path(name).stem`` without building a Path (this runs once a list line)."""
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _place_finder() -> Callable[[str], tuple[str, str]]:
    """``path`` -> (its folder with symlinks resolved, its file name); folders go through a
    small cache (lists are mostly grouped by folder; a bounded cache keeps a list of a million
    folders bounded too)."""

    @lru_cache(maxsize=4096)
    def resolved(folder: str) -> str:
        return os.path.realpath(folder or ".")

    def place(path: str) -> tuple[str, str]:
        folder, name = os.path.split(path.rstrip(os.sep) or path)
        return resolved(folder), name

    return place
