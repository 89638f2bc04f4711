"""Which column of a Parquet table holds its images: one rule for ``caption`` and ``train``.

The same file must be read the same way by every command, so both ask :func:`image_column`.
The order is what a Hugging Face ``datasets`` user expects (``Dataset.to_parquet`` stores an
``Image`` feature as a struct ``{bytes, path}``, usually in a column named ``image``):

1. the column named ``image`` (any case), when it holds an ``Image`` struct or bytes;
2. else the first ``Image`` struct column (an ``Image`` feature under another name);
3. else the first binary column (raw image bytes, as WebDataset-style tables hold them);
4. else the first string column named one of :data:`PATH_COLUMNS` (paths to image files).

"First" is the table's own column order. When another column could also be the images,
:attr:`ImageColumn.note` says which one was taken and why, so the caller can tell the user.
pyarrow is imported only when a schema is judged: reading the rule costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

from vision_server.file_presence import FilePresence

ColumnKind = Literal["bytes", "struct", "path"]
PATH_COLUMNS = ("path", "file", "file_name", "filename", "image_path")
PREFERRED = "image"
RULE = (
    "an image column is a Hugging Face Image struct {bytes, path} or a binary column "
    f"(one named {PREFERRED!r} first), or a string column of paths named {', '.join(PATH_COLUMNS)}"
)


class ImageColumnError(ValueError):
    """The table has no column that holds images, or the one asked for does not."""


@dataclass(frozen=True)
class ImageColumn:
    """The chosen column, how its values hold images, and the other columns that could have."""

    name: str
    kind: ColumnKind
    passed_over: tuple[str, ...] = ()

    @property
    def note(self) -> str | None:
        """Why this column and not the others, when there were others; None when it was the only one."""
        if not self.passed_over:
            return None
        others = ", ".join(repr(name) for name in self.passed_over)
        return f"images are read from column {self.name!r}, not {others} ({RULE}; the first such wins)"


def column_kind(field_type: Any) -> ColumnKind | None:
    """How a column of this Arrow type holds images, or None when it cannot."""
    import pyarrow as pa

    if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
        return "bytes"
    if pa.types.is_struct(field_type):
        index = field_type.get_field_index("bytes")
        if index >= 0 and column_kind(field_type.field(index).type) == "bytes":
            return "struct"  # the Hugging Face datasets Image feature: {bytes, path}
        return None
    if pa.types.is_string(field_type) or pa.types.is_large_string(field_type):
        return "path"
    return None


def image_column(schema: Any, wanted: str | None = None) -> ImageColumn:
    """The column of ``schema`` (a ``pyarrow.Schema``) that holds the images: ``wanted`` when
    given (checked), else by the rule above; :class:`ImageColumnError` names the columns."""
    if wanted is not None:
        if wanted not in schema.names:
            raise ImageColumnError(f"no column {wanted!r} (columns: {', '.join(schema.names)})")
        kind = column_kind(schema.field(wanted).type)
        if kind is None:
            raise ImageColumnError(
                f"column {wanted!r} holds {schema.field(wanted).type}, not image bytes or paths"
            )
        return ImageColumn(wanted, kind)
    found: dict[str, ColumnKind] = {}
    for name in schema.names:
        kind = column_kind(schema.field(name).type)
        if kind is not None and (kind != "path" or name.lower() in PATH_COLUMNS):
            found[name] = kind
    if not found:
        columns = ", ".join(f"{name} ({schema.field(name).type})" for name in schema.names)
        raise ImageColumnError(f"no image column found (columns: {columns or 'none'}); {RULE}")

    def rank(name: str) -> int:
        if name.lower() == PREFERRED and found[name] != "path":
            return 0
        return {"struct": 1, "bytes": 2, "path": 3}[found[name]]

    chosen = min(found, key=rank)  # min keeps the table's order among equals
    return ImageColumn(chosen, found[chosen], tuple(name for name in found if name != chosen))


def image_path(table_path: Path, value: Any) -> Path | None:
    """Where a path column's ``value`` points: relative to the table's folder, an absolute one
    as it is; None for what cannot be a path (empty, not a string, a line break in it)."""
    if not isinstance(value, str) or not value or "\n" in value:
        return None
    listed = Path(value)
    return listed if listed.is_absolute() else table_path.parent / listed


def names_a_file(image: Path | None) -> TypeGuard[Path]:
    """Whether ``image`` (a path column's value, as :func:`image_path` reads it) exists."""
    try:
        return image is not None and image.exists()
    except OSError:  # a name too long for the file system is no path either
        return False


def paths_problem(table_path: Path, column: str, values: Iterable[Any]) -> str | None:
    """Why a string ``column`` holds no image paths (text, say: the captions), or None when one
    of its values names an existing file or it has no values to judge.

    ``vision-server caption`` and ``train`` both ask this of a column ``--image-column`` names,
    so the user reads one line that says what the column is instead of one "no such file" per
    row. ``values`` is read only up to the first path that exists, so a real path column costs
    a look at its first value; a column none of whose files exists is judged a folder at a time
    (:mod:`vision_server.file_presence`), not one look per value.
    """
    missing = none_exists(table_path, values)
    if missing is None:
        return None
    count, first = missing
    return (
        f"column {column!r} holds no image paths: none of its {count} values is an existing "
        f"file (the first is {excerpt(first)})"
    )


def none_exists(table_path: Path, values: Iterable[Any]) -> tuple[int, str] | None:
    """(how many, the first) of ``values`` when none of them names an existing file, read as
    :func:`image_path` reads them (relative to ``table_path``'s folder); None as soon as one
    does, or when there is no value to judge. Shared by Parquet path columns and path lists."""
    presence = FilePresence()
    folder = os.path.join(table_path.parent, "")  # ends in a separator: values join it as text
    count, first = 0, None
    for value in values:
        if not isinstance(value, str) or not value:
            continue
        if _names_a_file(presence, folder, table_path, value):
            return None
        count += 1
        first = value if first is None else first
    return None if first is None else (count, first)


def _names_a_file(presence: FilePresence, folder: str, table_path: Path, value: str) -> bool:
    """:func:`names_a_file` of ``value``, asked of ``presence``. A plain relative value (no drive, no
    leading or trailing separator, no line break) joins the table's folder as text, which
    names what :func:`image_path` names at a fraction of its cost; any other goes that way."""
    if value[0] in "/\\" or value[-1] in "/\\" or ":" in value or "\n" in value:
        image = image_path(table_path, value)
        return image is not None and presence.exists(str(image))
    return presence.exists(folder + value)


def one_line(text: str, width: int = 120) -> str:
    """``text`` on one line of at most ``width`` characters (a value quoted in a message)."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def excerpt(text: str, width: int = 60) -> str:
    """A value quoted in a message: on one line, cut short."""
    return repr(one_line(text, width))
