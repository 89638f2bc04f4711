"""Captions from a JSON Lines file (``--gallery-jsonl``), matched to gallery images by path.

Reads the rows ``vision-server caption --jsonl`` writes (``key`` relative to the folder,
``caption`` or one field per task) and Hugging Face ``metadata.jsonl`` rows (``file_name`` and
``text``). Later rows win, as a rerun appends. Re-read when the file changes; while it is gone
or cannot be read the gallery shows none of its captions (the server's log says why it cannot).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vision_server.bulk.records import task_slug
from vision_server.captionfiles import describe_os_error, printable
from vision_server.gallery.stamps import FileStamp, file_stamp

NAME_FIELDS = ("key", "file_name", "path", "file", "image", "image_path")
TEXT_FIELDS = ("caption", "text")
LABEL = "jsonl"
log = logging.getLogger(__name__)


def row_key(row: dict[str, Any], root: Path, real_root: Path) -> str | None:
    """The row's image as a path relative to the gallery root, or None when it names none there."""
    for name in NAME_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            text = value.strip().replace("\\", "/")
            if os.path.isabs(text):
                for base in (root, real_root):
                    try:
                        return Path(text).relative_to(base).as_posix()
                    except ValueError:
                        continue
                return None
            return text.removeprefix("./")
    return None


def row_captions(row: dict[str, Any]) -> dict[str, str]:
    """Source label → text: ``jsonl`` for a single caption, ``jsonl <task>`` for per-task fields."""
    captions: dict[str, str] = {}
    task, tasks = row.get("task"), row.get("tasks")
    if isinstance(tasks, list):  # several tasks: one field per task, named by its slug
        for each in tasks:
            slug = task_slug(each) if isinstance(each, str) else None
            if slug and isinstance(row.get(slug), str):
                captions[f"{LABEL} {each}"] = row[slug]
        return captions
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            captions[f"{LABEL} {task}" if isinstance(task, str) else LABEL] = row[name]
            break
    return captions


class JsonlCaptions:
    """The file's captions by image key, re-read whenever its stamp (:func:`file_stamp`) changes."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self._root = root
        self._real_root = root.resolve()
        self._stamp: FileStamp | None = None
        self._captions: dict[str, dict[str, str]] = {}

    def captions(self) -> dict[str, dict[str, str]]:
        try:
            info = os.stat(self.path)
        except OSError:
            self._stamp, self._captions = None, {}
            return self._captions
        stamp = file_stamp(info)
        if stamp != self._stamp:
            try:
                self._captions = self._read()
            except OSError as exc:  # unreadable now (its permissions, a folder in its place)
                # as a missing file: the gallery still lists, without these captions; said once
                # per change of the file, in the log, as every other file is named there
                log.warning(
                    "gallery: cannot read the --gallery-jsonl file %s: %s; its captions are not shown",
                    printable(str(self.path)),
                    describe_os_error(exc),
                )
                self._captions = {}
            self._stamp = stamp
        return self._captions

    def _read(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                key = row_key(row, self._root, self._real_root)
                captions = row_captions(row)
                if key is not None and captions:
                    found.setdefault(key, {}).update(captions)
        return found
