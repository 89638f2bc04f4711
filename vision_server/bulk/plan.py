"""Per record, before any decoding: caption it (which tasks), skip it (done), or fail it (why)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from vision_server.bulk.outputs import Output, Sidecars
from vision_server.bulk.records import Record, safe_text
from vision_server.captionfiles import shared_caption_reason


@dataclass(frozen=True)
class Work:
    record: Record
    tasks: tuple[str, ...]  # the tasks some output still lacks


@dataclass(frozen=True)
class Skip:
    record: Record
    reason: str


@dataclass(frozen=True)
class Fail:
    record: Record
    reason: str


Unit = Work | Skip | Fail


def plan_record(record: Record, tasks: Sequence[str], outputs: Sequence[Output]) -> Unit:
    if record.error is not None:
        return Fail(record, record.error)
    sidecars = sidecars_among(outputs) if record.path is not None else None
    if sidecars is not None and record.stem_clash:
        assert record.path is not None
        names = [safe_text(sidecars.path(record.path, task).name) for task in tasks]
        return Fail(record, shared_caption_reason(names, record.stem_clash))
    blocked = sidecars.blocked(record, tasks) if sidecars is not None else None
    if blocked is not None:
        return Fail(record, blocked)
    if sidecars is not None:
        sidecars.notice_other_naming(record, tasks)
    missing = {task for output in outputs for task in output.missing(record, tasks)}
    if not missing:
        return Skip(record, "already captioned")
    return Work(record, tuple(task for task in tasks if task in missing))


def sidecars_among(outputs: Sequence[Output]) -> Sidecars | None:
    """The caption-file output, also behind the ``--prefix``/``--suffix`` wrapper (its ``inner``)."""
    for output in outputs:
        inner = getattr(output, "inner", output)
        if isinstance(inner, Sidecars):
            return inner
    return None


def plan(
    records: Iterable[Record], tasks: Sequence[str], outputs: Sequence[Output], limit: int | None = None
) -> Iterator[Unit]:
    """Plan every record; after ``limit`` images to caption, stop reading."""
    planned = 0
    for record in records:
        if limit is not None and planned >= limit:
            return
        unit = plan_record(record, tasks, outputs)
        planned += isinstance(unit, Work)
        yield unit
