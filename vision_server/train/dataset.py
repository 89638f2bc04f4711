"""Training examples (an image and its caption) from a folder, a JSONL file or a Parquet table.

Everything is checked before a model loads: every image must have a non-empty caption and decode,
every caption must have an image. Problems are collected, not raised one by one, so a single
:class:`DatasetError` names every file to fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision_server.bulk.records import task_slug
from vision_server.captionfiles import file_problem, is_hidden, is_image
from vision_server.errors import InvalidImage, PayloadTooLarge
from vision_server.images import LOCAL_FILE, STORED, open_image
from vision_server.parquet_images import (
    ImageColumnError,
    excerpt,
    image_column,
    image_path,
    names_a_file,
    one_line,
    paths_problem,
)

TEXT_FIELDS = ("text", "caption")
MAX_PIXELS = 256_000_000  # a training set is the user's own files: only refuse absurd sizes
# as vision-server caption words a bad file, less the option train does not have
TRAIN_FILE = dataclasses.replace(LOCAL_FILE, too_big="Downscale it.")
TRAIN_STORED = dataclasses.replace(STORED, too_big="Downscale it.")
LISTED = 20  # files named per problem; the rest are counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training pair. ``name`` is what messages call it (a path, or a table row)."""

    name: str
    text: str
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Problems:
    """Files grouped by what is wrong with them."""

    groups: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.groups.setdefault(kind, []).append(name)

    def __bool__(self) -> bool:
        return bool(self.groups)


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message lists each problem with its files."""

    def __init__(self, source: Path, problems: Problems | str) -> None:
        if isinstance(problems, str):
            text = f"{source}: {problems}"
        else:
            lines = [f"{source}: the dataset has problems; fix them and run again:"]
            for kind, names in problems.groups.items():
                lines.append(f"  {kind} ({len(names)}):")
                lines += [f"    {name}" for name in names[:LISTED]]
                if len(names) > LISTED:
                    lines.append(f"    ... and {len(names) - LISTED} more")
            text = "\n".join(lines)
        super().__init__(text)


class ImageChanged(DatasetError):
    """An image that passed the check at the start cannot be read when training comes to it
    (deleted, truncated, replaced): the run stops there, naming it; ``note`` says what was kept."""

    def __init__(self, source: Path, name: str, reason: str) -> None:
        super().__init__(
            source,
            f"{name} can no longer be read ({reason}); it changed after the run checked it at its start",
        )
        self.note = ""

    def __str__(self) -> str:
        return super().__str__() + (f"\n{self.note}" if self.note else "")


class OptionError(ValueError):
    """An option does not fit the dataset (``--image-column`` for a folder, a column that holds
    no images): a usage error (exit 2), not a problem of the files."""


class SplitError(OptionError):
    """``--val-split`` holds out every image."""


NO_CAPTION = "images without captions"
NO_IMAGE = "captions without images"
UNREADABLE = "unreadable images"
EMPTY = "empty captions"


def load_dataset(
    source: Path, *, caption_ext: str = "txt", task: str = "", image_column: str | None = None
) -> list[Example]:
    """Every example of ``source``, checked; :class:`DatasetError` names whatever is wrong."""
    source = Path(source)
    problems = Problems()
    if image_column is not None and (source.is_dir() or source.suffix.lower() != ".parquet"):
        kind = "a folder" if source.is_dir() else f"a {source.suffix or 'file without extension'}"
        raise OptionError(
            f"--image-column applies to a .parquet dataset only; {source} is {kind} "
            "(leave --image-column out)"
        )
    if source.is_dir():
        examples = list(_folder(source, caption_ext.lstrip("."), problems))
    elif source.suffix.lower() == ".jsonl":
        examples = list(_jsonl(source, task, problems))
    elif source.suffix.lower() == ".parquet":
        examples = _parquet(source, problems, image_column)
    elif not source.exists():
        raise DatasetError(source, "no such file or folder")
    else:
        raise DatasetError(source, "not a folder of images, a .jsonl file or a .parquet file")
    for example in examples:
        if not example.text.strip():
            problems.add(EMPTY, example.name)
    for example in examples:
        reason = _unreadable(example)
        if reason:
            problems.add(UNREADABLE, f"{example.name} ({reason})")
    if problems:
        raise DatasetError(source, problems)
    if not examples:
        raise DatasetError(source, "the dataset is empty: no images with captions were found")
    return examples


def split(examples: list[Example], val_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): ``val_split`` below 1 is a fraction, from 1 on a count; chosen by seed."""
    if val_split <= 0:
        return examples, []
    count = int(val_split) if val_split >= 1 else max(1, round(len(examples) * val_split))
    if count >= len(examples):
        raise SplitError(
            f"--val-split {val_split:g} leaves no training images (the dataset has {len(examples)})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [ex for i, ex in enumerate(examples) if i in held]


def read_failure(exc: BaseException) -> str | None:
    """Why an image could not be read or decoded, as the lists of problems say it; None for an
    error that is not about the image."""
    if isinstance(exc, InvalidImage):
        return exc.reason
    if isinstance(exc, PayloadTooLarge):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return None


def _unreadable(example: Example) -> str | None:
    if example.path is not None:
        problem = file_problem(example.path)
        if problem:
            return problem
    try:
        source = TRAIN_STORED if example.data is not None else TRAIN_FILE
        open_image(example.read(), max_pixels=MAX_PIXELS, source=source).close()
    except InvalidImage as exc:
        return exc.reason
    except PayloadTooLarge as exc:  # over MAX_PIXELS: that image is left out, as a bad one is
        return exc.message
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# --- folders -------------------------------------------------------------------------------------


def _folder(root: Path, ext: str, problems: Problems) -> Iterator[Example]:
    """Images with a ``STEM.<ext>`` caption beside them, every sub-folder included, sorted;
    hidden files and folders below ``root`` are no part of it, as for the folder captioners."""
    suffix = f".{ext.lower()}"
    for folder in _folders(root):
        files = sorted(
            p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and not is_hidden(p.name)
        )
        images = {p.stem: p for p in files if is_image(p)}
        captions = {p.stem: p for p in files if p.suffix.lower() == suffix and not is_image(p)}
        others = {p.stem: p for p in files if p.suffix.lower() != suffix and not is_image(p)}
        for stem, image in images.items():
            caption = captions.get(stem)
            name = image.relative_to(root).as_posix()
            if caption is None:
                other = others.get(stem)
                hint = f"; found {other.name}: --caption-ext {other.suffix[1:]}?" if other else ""
                problems.add(NO_CAPTION, f"{name} (expected {stem}{suffix} beside it{hint})")
                continue
            text = caption.read_text(encoding="utf-8", errors="replace").strip()
            yield Example(name, text, path=image)
        for stem, caption in captions.items():
            task_sidecar = "." in stem and stem.rsplit(".", 1)[0] in images  # STEM.<task>.txt
            if stem not in images and not task_sidecar:
                problems.add(NO_IMAGE, caption.relative_to(root).as_posix())


def _folders(root: Path) -> list[Path]:
    """``root`` and the folders below it whose files are read, sorted. A hidden folder is not
    entered (``.git`` of a large repository would be walked to its end, only to be left out); a
    symlinked one has its own files read, not its sub-folders (no loops). A folder that cannot
    be listed stops the walk with its error."""
    found = [root]
    unvisited = [root]
    while unvisited:
        with os.scandir(unvisited.pop()) as entries:
            for entry in entries:
                if is_hidden(entry.name) or not _is_folder(entry):
                    continue
                found.append(Path(entry.path))
                if not entry.is_symlink():
                    unvisited.append(Path(entry.path))
    return sorted(found)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder or a symlink to one; a broken link or a loop is neither."""
    try:
        return entry.is_dir()
    except OSError:
        return False


# --- JSONL ---------------------------------------------------------------------------------------


def _jsonl(path: Path, task: str, problems: Problems) -> Iterator[Example]:
    """Rows ``{"file", "text"}`` (also ``path``/``image`` and ``caption``), or the rows the bulk
    captioner writes (``source``, ``key``, ``caption`` or one field per task)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                problems.add("lines that are not JSON objects", f"{path.name} line {number}")
                continue
            image = _row_image(row, path.parent)
            name = f"{path.name} line {number}"
            if image is None:
                problems.add(NO_IMAGE, f"{name} (no 'file' field)")
                continue
            text = _row_text(row, task)
            if text is None:
                problems.add(NO_CAPTION, f"{image} ({name}: no 'text' field)")
                continue
            if not image.exists():
                problems.add(NO_IMAGE, f"{image} ({name}: no such file)")
                continue
            yield Example(str(image), text.strip(), path=image)


def _row_image(row: dict[str, Any], base: Path) -> Path | None:
    for field_name in ("file", "path", "image"):
        value = row.get(field_name)
        if isinstance(value, str) and value:
            listed = Path(value).expanduser()
            return listed if listed.is_absolute() else base / listed
    source, key = row.get("source"), row.get("key")
    if isinstance(source, str) and isinstance(key, str):
        origin = Path(source)
        origin = origin if origin.is_absolute() else base / origin
        return origin / key if origin.is_dir() else origin
    return None


def _row_text(row: dict[str, Any], task: str) -> str | None:
    for key in (*TEXT_FIELDS, task_slug(task) if task else ""):
        value = row.get(key) if key else None
        if isinstance(value, str):
            return value
    return None


# --- Parquet -------------------------------------------------------------------------------------


def _parquet(path: Path, problems: Problems, wanted: str | None = None) -> list[Example]:
    """A table with a text column and an image column, chosen as ``vision-server caption``
    chooses it (:mod:`vision_server.parquet_images`): a Hugging Face Image struct, bytes or paths;
    ``wanted`` (``--image-column``) names it instead."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DatasetError(path, f"cannot read the Parquet file ({type(exc).__name__}: {exc})") from None
    names = table.schema.names
    text_column = next((n for n in names if n.lower() in TEXT_FIELDS), None)
    if text_column is None:
        raise DatasetError(path, f"needs a 'text' (or 'caption') column; it has {', '.join(names)}")
    if wanted is not None and wanted == text_column:
        raise OptionError(
            f"--image-column {wanted!r}: that is the caption text column of {path}, it holds no images "
            "or image paths; name the column of images, or leave --image-column out"
        )
    try:
        chosen = image_column(table.schema, wanted)
    except ImageColumnError as exc:
        if wanted is not None:
            raise OptionError(f"--image-column {wanted!r}: {path}: {exc}") from None
        raise DatasetError(path, f"{exc}; name one with --image-column") from None
    if chosen.note and wanted is None:
        log.warning("%s: %s; --image-column picks another", path, chosen.note)
    values = table.column(chosen.name).to_pylist()
    if chosen.kind == "path":
        _check_holds_paths(path, chosen.name, values, wanted)
    examples = []
    for row, (value, text) in enumerate(zip(values, table.column(text_column).to_pylist(), strict=True)):
        name = f"{path.name} row {row}"
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if text is None:
            problems.add(NO_CAPTION, name)
        elif isinstance(value, bytes) and value:
            examples.append(Example(name, str(text).strip(), data=value))
        elif isinstance(value, str) and value:
            image = image_path(path, value)
            if names_a_file(image):
                examples.append(Example(str(image), str(text).strip(), path=image))
            else:
                shown = str(image) if image is not None else excerpt(value)
                problems.add(NO_IMAGE, f"{one_line(shown)} ({name}: no such file)")
        else:
            problems.add(NO_IMAGE, f"{name} (no image)")
    return examples


def _check_holds_paths(table_path: Path, column: str, values: list[Any], wanted: str | None) -> None:
    """A path column none of whose values names an existing file: said once (shared with
    ``vision-server caption``), not as one missing file per row."""
    what = paths_problem(table_path, column, values)
    if what is None:
        return
    if wanted is not None:
        raise OptionError(f"--image-column {wanted!r}: {table_path}: {what}")
    raise DatasetError(table_path, what)
