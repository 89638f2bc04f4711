"""The read stage on Ray: bulk's readers and planner, split into read tasks that run on the cluster.

Why not ``ray.data.read_images``/``read_parquet``/``read_webdataset``: a row must carry the same
identity as in the local path (the path relative to its folder, a Parquet key column or row
number, a WebDataset ``__key__``) for the outputs to resume from, and a bad image, row or tar
member must become a reported failure, not a failed job. So each piece is read by the very
reader functions of :mod:`vision_server.bulk.readers`:

- files, folders, path lists and Parquet path columns are listed and planned on the driver (no
  image bytes are read there) and shipped as small chunks of paths; the workers read the files;
- a Parquet file of image bytes is one read task per row group, a WebDataset shard one read task
  per shard, both planned on the worker against a snapshot of what the outputs already hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from vision_server.bulk import readers
from vision_server.bulk.outputs import Output, Sidecars, _TableOutput
from vision_server.bulk.plan import Unit, plan_record
from vision_server.bulk.ray_rows import unit_rows
from vision_server.bulk.records import Record

PATHS_PER_TASK = 256  # at most this many planned paths per read task
MIN_PATHS_PER_TASK = 4
ROWS_PER_BLOCK = 16  # images per block from tables and shards: bounded memory per block


class DoneSnapshot:
    """A picklable copy of what a JSONL/Parquet output holds, to plan records on a worker."""

    def __init__(self, done: dict[str, set[str]]) -> None:
        self.inner = _TableOutput(facts=None, done=done)  # type: ignore[arg-type]

    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]:
        return self.inner.missing(record, tasks)


def snapshot(outputs: Sequence[Output]) -> list[Any]:
    """What a worker needs from ``outputs`` to plan a record exactly as the driver would."""
    copies: list[Any] = []
    for output in outputs:
        inner = getattr(output, "inner", output)  # the prefix/suffix wrapper does not change planning
        if isinstance(inner, Sidecars):
            copies.append(inner)
        elif isinstance(inner, _TableOutput):
            copies.append(DoneSnapshot({task: set(idents) for task, idents in inner.done.items()}))
        else:
            raise TypeError(f"cannot plan against {type(inner).__name__} on a worker")
    return copies


@dataclass(frozen=True)
class PlannedRows:
    """Units planned on the driver."""

    units: tuple[Unit, ...]


@dataclass(frozen=True)
class RowGroup:
    """One row group of a Parquet file of image bytes; ``first_row`` numbers rows as the local reader."""

    path: Path
    index: int
    first_row: int
    rows: int
    image_column: str
    kind: readers.ColumnKind
    key_column: str | None


@dataclass(frozen=True)
class Shard:
    """One WebDataset tar shard."""

    path: Path


Piece = PlannedRows | RowGroup | Shard


def row_group_pieces(path: Path, options: readers.ReadOptions) -> list[RowGroup] | None:
    """The row groups of a Parquet file of image bytes, or None when its metadata cannot be read
    (then the driver reads it the local way, which reports why)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        image_column, kind = readers._image_column(table.schema_arrow, options.image_column)
        key_column = readers._key_column(table.schema_arrow, options.key_column)
    except Exception:
        return None
    pieces, first = [], 0
    for index in range(table.metadata.num_row_groups):
        rows = table.metadata.row_group(index).num_rows
        pieces.append(RowGroup(path, index, first, rows, image_column, kind, key_column))
        first += rows
    return pieces


class CaptionSource(Datasource):
    """A Ray Data source over bulk's pieces; each read task yields Arrow blocks of planned rows."""

    def __init__(self, pieces: Sequence[Piece], tasks: Sequence[str], plan_ref: Any) -> None:
        super().__init__()
        self.pieces = list(pieces)
        self.tasks = tuple(tasks)
        self.plan_ref = plan_ref  # ray.put(snapshot(outputs)): sent once, not once per task

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        read_tasks = []
        for piece in self.pieces:
            rows = len(piece.units) if isinstance(piece, PlannedRows) else None
            metadata = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=None)
            read_tasks.append(
                ReadTask(
                    _reader(piece, self.tasks, self.plan_ref),
                    metadata,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return read_tasks


def _reader(piece: Piece, tasks: tuple[str, ...], plan_ref: Any) -> Any:
    def read() -> Iterator[pa.Table]:
        if isinstance(piece, PlannedRows):
            yield pa.table(unit_rows(piece.units))
            return
        import ray

        outputs = ray.get(plan_ref)
        records = _row_group(piece) if isinstance(piece, RowGroup) else readers._webdataset(piece.path)
        yield from _blocks(plan_record(record, tasks, outputs) for record in records)

    return read


def _blocks(units: Iterable[Unit]) -> Iterator[pa.Table]:
    chunk: list[Unit] = []
    for unit in units:
        chunk.append(unit)
        if len(chunk) >= ROWS_PER_BLOCK:
            yield pa.table(unit_rows(chunk))
            chunk = []
    if chunk:
        yield pa.table(unit_rows(chunk))


def _row_group(group: RowGroup) -> Iterator[Record]:
    """The rows of one row group, named exactly as :func:`readers._parquet` names them."""
    import pyarrow.parquet as pq

    source = str(group.path)
    columns = [group.image_column]
    if group.key_column and group.key_column != group.image_column:
        columns.append(group.key_column)
    try:
        batch = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
        values = batch.column(group.image_column).to_pylist()
        keys = batch.column(group.key_column).to_pylist() if group.key_column else [None] * len(values)
    except Exception as exc:
        last = group.first_row + group.rows - 1
        yield Record(
            source,
            f"row {group.first_row}",
            error=f"rows {group.first_row} to {last} cannot be read ({readers._short(exc)})",
        )
        return
    for offset, (value, key) in enumerate(zip(values, keys, strict=True)):
        row = group.first_row + offset
        yield readers._parquet_record(source, group.path.parent, row, value, key, group.kind)
