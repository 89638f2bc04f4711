"""Records as Ray Data rows and back: the columns that flow between the Ray stages.

Names travel as bytes (UTF-8 with surrogate escapes), because a POSIX file name may be any
bytes and Arrow strings must be valid UTF-8; an empty value means "none" (Arrow blocks then
keep one type per column whatever the batch holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vision_server.bulk.plan import Fail, Skip, Unit, Work
from vision_server.bulk.records import Record

TASK_SEPARATOR = "\n"  # task tokens never contain a newline


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def decode(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogateescape")


COLUMNS = ("source", "key", "path", "data", "tasks", "error", "skip")


def unit_rows(units: Iterable[Unit]) -> dict[str, list[Any]]:
    """Planned units as the read stage's columns: work (``tasks``), a failure to report
    (``error``), or an image already done (``skip``, the reason)."""
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for unit in units:
        record = unit.record
        columns["source"].append(encode(record.source))
        columns["key"].append(encode(record.key))
        columns["path"].append(encode(str(record.path)) if record.path is not None else b"")
        columns["data"].append((record.data or b"") if isinstance(unit, Work) else b"")
        columns["tasks"].append(TASK_SEPARATOR.join(unit.tasks) if isinstance(unit, Work) else "")
        columns["error"].append(unit.reason if isinstance(unit, Fail) else "")
        columns["skip"].append(unit.reason if isinstance(unit, Skip) else "")
    return columns


def row_record(row: dict[str, Any], *, with_data: bool = False) -> Record:
    """The record a row stands for (the image bytes only when asked: they are large)."""
    path = decode(row["path"])
    data = bytes(row["data"]) if with_data and len(row["data"]) else None
    return Record(decode(row["source"]), decode(row["key"]), path=Path(path) if path else None, data=data)


def row_tasks(row: dict[str, Any]) -> Sequence[str]:
    text = str(row["tasks"])
    return text.split(TASK_SEPARATOR) if text else ()


def batch_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A column batch (as Ray hands it to a map function) as one dict per row."""
    names = list(batch)
    count = len(batch[names[0]]) if names else 0
    return [{name: batch[name][index] for name in names} for index in range(count)]
