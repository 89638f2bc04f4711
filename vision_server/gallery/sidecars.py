"""Which files beside an image are its captions, and reading them safely.

``cat.png``'s captions are ``cat.txt`` (the kohya-ss convention the captioners write), other
caption extensions (``cat.caption``, ``cat.tags``), and per-task files the dataset captioner
writes with several tasks (``cat.generate_tags.txt``). The part after the image's stem names the
source: ``.txt``, ``.tags``, ``.generate_tags.txt``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from vision_server.captionfiles import is_image
from vision_server.gallery.stamps import FileStamp, file_stamp

PRIMARY = ".txt"  # the caption file the page edits by default and trainers read
SUFFIX = re.compile(r"^(\.[A-Za-z0-9_-]{1,40})?\.(txt|caption|tags)$")
CAPTION_ENDINGS = (".txt", ".caption", ".tags")
MAX_CAPTION_BYTES = 256 * 1024  # a caption file larger than this is shown cut, never read whole
MAX_SAVE_CHARS = 64 * 1024


def is_caption_suffix(suffix: str) -> bool:
    return bool(SUFFIX.match(suffix))


def by_stem(names_in_folder: list[str]) -> dict[str, tuple[str, ...]]:
    """Every caption file of a folder under each stem it may belong to, ``.txt`` first.

    ``cat.generate_tags.txt`` is filed under ``cat`` (as ``.generate_tags.txt``) and under
    ``cat.generate_tags`` (as ``.txt``): the image's own stem picks. One pass per folder, so a
    folder of many thousand images is not searched once per image.
    """
    found: dict[str, list[str]] = {}
    for name in names_in_folder:
        if not name.endswith(CAPTION_ENDINGS) or is_image(Path(name)):
            continue
        dots = [i for i, char in enumerate(name) if char == "."][-2:]
        for dot in dots:
            if dot > 0 and is_caption_suffix(name[dot:]):
                found.setdefault(name[:dot], []).append(name[dot:])
    return {stem: primary_first(suffixes) for stem, suffixes in found.items()}


def primary_first(suffixes: Iterable[str]) -> tuple[str, ...]:
    """Caption suffixes in the order the gallery shows them: ``.txt`` first, then by name."""
    return tuple(sorted(suffixes, key=lambda suffix: (suffix != PRIMARY, suffix)))


def sidecars_of(image_name: str, names_in_folder: list[str]) -> tuple[str, ...]:
    """The caption suffixes present for ``image_name`` among its folder's file names, ``.txt`` first."""
    return by_stem(names_in_folder).get(Path(image_name).stem, ())


def sidecar_path(image: Path, suffix: str) -> Path:
    return image.with_name(image.stem + suffix)


class TextCache:
    """Caption file contents keyed by path and :func:`file_stamp`: a search over thousands of
    captions reads each file once, and an edit is seen at once."""

    def __init__(self, limit: int = 200_000) -> None:
        self._texts: dict[Path, tuple[FileStamp, str]] = {}
        self._limit = limit

    def read(self, path: Path) -> str | None:
        """The text (UTF-8, BOM dropped, undecodable bytes replaced), or None when there is no file.

        Only a regular file is read: opening a FIFO named like a caption (a downloaded dataset's
        tar archive can hold one) waits for a writer forever, and with it the whole gallery.
        """
        try:
            info = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        stamp = file_stamp(info)
        cached = self._texts.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CAPTION_BYTES)
        except OSError:
            return None
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
        if len(self._texts) >= self._limit:
            self._texts.clear()
        self._texts[path] = (stamp, text)
        return text
