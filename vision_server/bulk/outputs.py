"""Where captions go: sidecar files beside the images, JSON Lines, Parquet; and what is done.

Every output answers :meth:`missing` (which of the run's tasks it still lacks for a record, so a
rerun resumes) and :meth:`write`. Nothing is ever half-written: sidecars are replaced atomically,
a JSONL row is one flushed line (a torn last line from a killed run is ignored and terminated),
and Parquet rows go to an append-only journal that is folded into the Parquet file, atomically,
when the run ends, or by the next run when this one was killed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vision_server.atomic_files import replacing
from vision_server.bulk.records import Record, safe_text, task_slug
from vision_server.captionfiles import (
    STALE_TEMP_AGE,
    WRITTEN_MEANWHILE,
    Mode,
    NotACaptionFile,
    ReadOnlyCaption,
    caption_target_problem,
    has_caption,
    merge_caption,
    one_line,
    printable,
    read_caption,
    remove_stale_files,
    write_atomic,
    write_new_caption,
)
from vision_server.disk_full import DiskFull, is_disk_full, raise_as_disk_full
from vision_server.line_logs import LineLog
from vision_server.model_specs import adapter_identity, model_identity

Captions = dict[str, str]  # task token -> caption text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowFacts:
    """What every row says besides captions: which tasks the run asked for, model and adapter.

    They also say which rows already there are this run's to resume from (:meth:`is_ours`).
    """

    tasks: tuple[str, ...]
    # the served name (``--model NAME=SOURCE``: NAME); an unnamed model's source, a local folder
    # as :func:`~vision_server.model_specs.model_identity` names it (its resolved absolute path)
    model: str
    adapter: str | None  # its folder as :func:`~vision_server.model_specs.adapter_identity` names it
    # other names older rows gave this model: before rows held the served name, they held the
    # source (``SOURCE`` of ``--model NAME=SOURCE``)
    older_names: tuple[str, ...] = ()
    # an unnamed local model: rows' models are compared as folders (rows of earlier versions
    # hold the path as it was typed, resolved from this run's working directory)
    local_model: bool = False
    # each model or adapter older rows recorded, as this run resolves it: rows hold few distinct
    # ones, so each is resolved once however many rows there are. Per run, not per process: a
    # relative path resolves from the working directory, which another run in-process may change.
    _resolved: dict[tuple[str, str], str] = field(default_factory=dict, compare=False, repr=False)

    def is_ours(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` counts for this run's model, as ``vision-client folder`` resumes per
        model: its ``model`` is this model's name (or an older name of it) and its ``adapter``
        this run's. A row that names no model (``model`` absent or null) cannot be placed; it
        counts, as every row did before resuming compared models."""
        model = row.get("model")
        if model is None:
            return True
        same = model == self.model or model in self.older_names
        if not same and self.local_model and isinstance(model, str):
            same = self._as_resolved(model) == self.model
        return same and self._adapter_of(row) == self.adapter

    def _adapter_of(self, row: dict[str, Any]) -> str | None:
        """The adapter a row was captioned with. Rows written before rows held the resolved path
        hold it as it was typed (``my-adapter/``), relative to that run's working directory:
        resolved from this run's, so a rerun from the same folder matches them."""
        recorded = row.get("adapter")
        if not isinstance(recorded, str) or not recorded:
            return None
        return self._as_resolved(recorded, adapter=True)

    def _as_resolved(self, recorded: str, *, adapter: bool = False) -> str:
        """A row's model (:func:`~vision_server.model_specs.model_identity`) or adapter
        (:func:`~vision_server.model_specs.adapter_identity`) as this run names it; an adapter
        path that cannot be resolved (a loop, a NUL) as it is, which is not this run's."""
        key = ("adapter" if adapter else "model", recorded)
        resolved = self._resolved.get(key)
        if resolved is None:
            try:
                resolved = adapter_identity(recorded) if adapter else model_identity(recorded)
            except (OSError, RuntimeError, ValueError):
                resolved = recorded
            self._resolved[key] = resolved
        return resolved


class ModelRows:
    """Rows read back, filtered to this run's model (:meth:`RowFacts.is_ours`), counting the rest
    so the run can say why images recorded in the file are captioned again."""

    def __init__(self, facts: RowFacts) -> None:
        self.facts = facts
        self.nameless = 0  # rows that name no model (taken as this model's)
        self.others: dict[str, int] = {}  # model (and adapter) -> rows left out

    def select(self, rows: Iterable[Any]) -> Iterator[Any]:
        for row in rows:
            if not isinstance(row, dict):
                yield row
            elif row.get("model") is None:
                self.nameless += 1
                yield row
            elif self.facts.is_ours(row):
                yield row
            else:
                name = str(row.get("model")) + (f" + {row['adapter']}" if row.get("adapter") else "")
                self.others[name] = self.others.get(name, 0) + 1

    def report(self, path: Path) -> None:
        """Say (once, when the output is opened) what was not resumed from, and why."""
        if self.others:
            held = ", ".join(f"{count} of {name}" for name, count in self.others.items())
            mine = self.facts.model + (f" + {self.facts.adapter}" if self.facts.adapter else "")
            log.info(
                "%s: resuming from the rows of %s only; its rows of other models (%s) stay as they "
                "are, and their images are captioned again with this model",
                path,
                mine,
                held,
            )
        if self.nameless:
            log.warning(
                "%s: %d row(s) name no model; they count as done for this run's model too "
                "(write to a new file to caption those images again)",
                path,
                self.nameless,
            )


def identity(record: Record) -> str:
    """The name a table output knows an image by: its input and its key."""
    return _identity(safe_text(record.source), safe_text(record.key))


def _identity(source: str, key: str) -> str:
    """A row's or a record's identity, its source compared as the path it names."""
    return f"{same_input(source)}\x00{key}"


@functools.lru_cache(maxsize=1024)
def same_input(source: str) -> str:
    """``source`` as the file or folder it names: ``dataset``, ``dataset/``, ``./dataset`` and
    ``/data/dataset`` (from ``/data``) are one input, so a rerun that spells its input another
    way resumes instead of captioning everything again beside the old rows. Rows keep the
    source as given; a relative one is read from the run's working directory.

    Cached (a table of millions of rows names a few inputs; asking for the working directory
    each time would cost more than the rest of the lookup), and the cache is emptied each time
    an output reads its rows back (:func:`recorded`), so a process that runs again from
    another folder does not get the answers of the one before.
    """
    try:
        return os.path.realpath(source)
    except (OSError, ValueError):  # a NUL in it, say: no path, compared as written
        return source


def make_row(record: Record, facts: RowFacts, captions: Captions, error: str | None = None) -> dict[str, Any]:
    """One JSONL/Parquet row. One task: ``task`` and ``caption``. Several: ``tasks`` and one
    field per task named like its sidecar infix (``generate_tags``, ``caption``, ...)."""
    row: dict[str, Any] = {"source": safe_text(record.source), "key": safe_text(record.key)}
    if len(facts.tasks) == 1:
        row["task"] = facts.tasks[0]
        row["caption"] = captions.get(facts.tasks[0])
    else:
        row["tasks"] = [task for task in facts.tasks if task in captions or error]
        for task in facts.tasks:
            row[task_slug(task)] = captions.get(task)
    row["model"] = facts.model
    row["adapter"] = facts.adapter
    if error is not None:
        row["error"] = error
    return row


def recorded(rows: Iterable[Any]) -> dict[str, set[str]]:
    """task → identities with a caption for it, from rows of either shape."""
    same_input.cache_clear()  # a new read: relative inputs resolve from this working directory
    done: dict[str, set[str]] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        source, key = row.get("source"), row.get("key")
        if not isinstance(source, str) or not isinstance(key, str):
            continue
        ident = _identity(source, key)
        task, tasks = row.get("task"), row.get("tasks")
        if isinstance(task, str) and isinstance(row.get("caption"), str):
            done.setdefault(task, set()).add(ident)
        if isinstance(tasks, list):
            for name in tasks:
                if isinstance(name, str) and isinstance(row.get(task_slug(name)), str):
                    done.setdefault(name, set()).add(ident)
    return done


class RowShapes:
    """The row shapes an existing output holds (one task: ``task``/``caption``; several:
    ``tasks`` and a field per task) and the tasks of each, noted while its rows are read back.

    A run whose rows would have the other shape is refused before any work: a reader of the file
    (a training script, ``pandas.read_json``) expects one shape, and a Parquet table would get
    half-empty columns. A file that already holds both (written by an older version) is left to
    resume as it is.
    """

    def __init__(self) -> None:
        self.one: dict[str, None] = {}  # the tasks of one-task rows, in the order first seen
        self.several: dict[tuple[str, ...], None] = {}  # the task lists of several-task rows

    def note(self, rows: Iterable[Any]) -> Iterator[Any]:
        """``rows`` unchanged, noting each row's shape on the way."""
        for row in rows:
            if isinstance(row, dict):
                tasks, task = row.get("tasks"), row.get("task")
                if isinstance(tasks, list):
                    self.several.setdefault(tuple(str(name) for name in tasks), None)
                elif isinstance(task, str):
                    self.one.setdefault(task, None)
            yield row

    def refusal(self, path: Path, tasks: Sequence[str]) -> str | None:
        """Why a run of ``tasks`` may not add rows to ``path``, or None when it may."""
        if len(tasks) > 1 and self.one and not self.several:
            held = ", ".join(self.one)
            return (
                f"{path} holds rows of one task each ({held}: fields task and caption); this run's "
                f"{len(tasks)} tasks would add rows of another shape (tasks, and a field per task) "
                "beside them. Add a task to it with a run of that task alone (one --task), or write "
                "the tasks to a new file."
            )
        if len(tasks) == 1 and self.several and not self.one:
            held = " ".join(f"--task {task_slug(name)}" for name in next(iter(self.several)))
            return (
                f"{path} holds rows of several tasks (fields tasks, and one per task); this run's "
                f"one task would add rows of another shape (task and caption) beside them. Run with "
                f"the tasks that wrote it ({held}), or write to a new file."
            )
        return None


class Output(Protocol):
    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]: ...

    def write(self, record: Record, captions: Captions, error: str | None) -> bool:
        """Store what ``record`` lacks; whether anything was stored (False: it was there)."""
        ...

    def close(self) -> None: ...


# --- sidecars ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarStyle:
    """Named and meant exactly as ``vision-client folder``'s options of the same names."""

    ext: str = ".txt"  # already checked by captionfiles.caption_suffix
    mode: Mode = "skip"
    separator: str = " "
    several_tasks: bool = False  # then sidecars are STEM.<task>.<ext>
    prefix: str = ""  # around each new caption, kept as given (the caption goes on one line)
    suffix: str = ""


def sidecar_path(image: Path, task: str, style: SidecarStyle) -> Path:
    if style.several_tasks:
        return image.with_name(f"{image.stem}.{task_slug(task)}{style.ext}")
    return image.with_suffix(style.ext)


class Sidecars:
    """A caption file beside each image that has a path (not for images inside tables/shards)."""

    def __init__(self, style: SidecarStyle) -> None:
        self.style = style
        self.other_naming: Path | None = None  # a caption file named for another number of tasks

    def notice_other_naming(self, record: Record, tasks: Sequence[str]) -> None:
        """Warn, once a run, when an image has a caption file named as a run with the other
        number of tasks names it: ``STEM.txt`` (one task) beside this run's ``STEM.<task>.txt``
        (several), or ``STEM.<task>.txt`` beside this run's ``STEM.txt``.

        That file is neither read nor counted as done (which task wrote a ``STEM.txt`` is not
        recorded, and trainers read ``STEM.txt``), so the run captions the image and writes its
        own files beside it; without a word a user would expect it resumed, or find two sets of
        files. Stops looking after the first one: one ``stat`` an image until then.
        """
        if self.other_naming is not None or record.path is None:
            return
        image = record.path
        if self.style.several_tasks:
            candidates = [image.with_suffix(self.style.ext)]
        else:
            candidates = [
                image.with_name(f"{image.stem}.{task_slug(task)}{self.style.ext}") for task in tasks
            ]
        found = next((path for path in candidates if has_caption(path)), None)
        if found is None:
            return
        self.other_naming = found
        ours = ", ".join(printable(sidecar_path(image, task, self.style).name) for task in tasks)
        if self.style.several_tasks:
            log.warning(
                "%s exists, as a run of one task names caption files; this run of %d tasks names "
                "them by task (%s), leaves such files as they are and does not count them as done "
                "(their task is not recorded). To keep one caption file per image, run one --task "
                "at a time (--mode append adds to it). Not said again for other images.",
                printable(str(found)),
                len(tasks),
                ours,
            )
        else:
            log.warning(
                "%s exists, as a run of several tasks names caption files; this run of one task "
                "writes %s (the name trainers read), leaves such files as they are and does not "
                "count them as done. To resume the several-task run, give it the same --task "
                "list. Not said again for other images.",
                printable(str(found)),
                ours,
            )

    def path(self, image: Path, task: str) -> Path:
        """Where ``image``'s caption for ``task`` goes."""
        return sidecar_path(image, task, self.style)

    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]:
        if record.path is None:
            return []
        if self.style.mode != "skip":
            return list(tasks)
        return [task for task in tasks if not has_caption(sidecar_path(record.path, task, self.style))]

    def blocked(self, record: Record, tasks: Sequence[str]) -> str | None:
        """Why no caption file can go where ``record``'s belongs (a directory is there, or its name
        is too long for the file system), if so: the image fails instead of being captioned for
        nothing, taken for done, or stopping the run."""
        if record.path is None:
            return None
        for task in tasks:
            problem = caption_target_problem(sidecar_path(record.path, task, self.style))
            if problem is not None:
                return problem
        return None

    def write(self, record: Record, captions: Captions, error: str | None) -> bool:
        """Write the caption files still missing, looked for again now: in ``skip`` mode one that
        appeared since the run planned the image (another run, a caption saved in the gallery)
        is left as it is, and when every one did, nothing was stored (the image is skipped)."""
        if record.path is None:
            return False
        stored = False
        for task in self.missing(record, list(captions)):
            target = sidecar_path(record.path, task, self.style)
            new = f"{self.style.prefix}{one_line(captions[task])}{self.style.suffix}"
            try:
                if self.style.mode == "skip":
                    stored = write_new_caption(target, new) or stored
                    continue
                existing = read_caption(target) if self.style.mode in ("append", "prepend") else None
                write_atomic(target, merge_caption(existing, new, self.style.mode, self.style.separator))
            except OSError as exc:  # a full disk names the caption file, not its temporary file
                raise_as_disk_full(target, exc)
            stored = True
        return stored

    def close(self) -> None:
        pass


# --- JSON Lines ----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[Any]:
    """Every parseable line; a torn or foreign line is skipped."""
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def row_line(row: dict[str, Any]) -> str:
    """One JSONL/journal line: the row as JSON, non-ASCII kept readable."""
    return json.dumps(row, ensure_ascii=False) + "\n"


class _TableOutput:
    """Shared by JSONL and Parquet: resume from what is recorded, write only what is missing."""

    def __init__(self, facts: RowFacts, done: dict[str, set[str]], shapes: RowShapes | None = None) -> None:
        self.facts = facts
        self.done = done
        self.shapes = shapes if shapes is not None else RowShapes()  # of the rows already there

    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]:
        ident = identity(record)
        return [task for task in tasks if ident not in self.done.get(task, ())]

    def _new_captions(self, record: Record, captions: Captions) -> Captions:
        wanted = self.missing(record, list(captions))
        return {task: text for task, text in captions.items() if task in wanted}

    def _remember(self, record: Record, captions: Captions) -> None:
        for task in captions:
            self.done.setdefault(task, set()).add(identity(record))


class JsonlOutput(_TableOutput):
    """``--jsonl FILE``: a row per image, failed ones too (with ``error``), appended as they finish."""

    def __init__(self, path: Path, facts: RowFacts) -> None:
        # A rerun reports a still-bad image again, but does not add the same error row again
        # (the same model's: another model's run records its own failures).
        self._errors: set[tuple[str, str]] = set()
        shapes = RowShapes()
        mine = ModelRows(facts)
        super().__init__(
            facts, recorded(self._note_errors(mine.select(shapes.note(read_jsonl(path))))), shapes
        )
        mine.report(path)
        self._log = LineLog(path)  # opened on the first row: a dry run creates nothing

    def write(self, record: Record, captions: Captions, error: str | None) -> bool:
        new = self._new_captions(record, captions)
        if error is not None and not new:
            if (identity(record), error) in self._errors:
                return False
            self._errors.add((identity(record), error))
        elif not new:
            return False
        self._log.append(row_line(make_row(record, self.facts, new, error)))
        self._remember(record, new)
        return True

    def _note_errors(self, rows: Iterable[Any]) -> Iterator[Any]:
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("error"), str):
                self._errors.add((_identity(str(row.get("source")), str(row.get("key"))), row["error"]))
            yield row

    def close(self) -> None:
        self._log.close()


class ParquetOutput(_TableOutput):
    """``--parquet FILE``: captioned images only; rows are journaled, then folded in at close."""

    def __init__(self, path: Path, facts: RowFacts, *, sweep: bool = True, locked: bool = False) -> None:
        # Where the table is: the fold renames a new file over it, which would replace a symlink
        # to it with a plain file (the rows beside the link, the table it names left behind),
        # and the journal goes beside the table, so every spelling of it finds the same one.
        path = Path(os.path.realpath(path))
        self.path = path
        self.journal = path.with_name(f".{path.name}.journal.jsonl")
        # A run killed while folding left its temp file (as big as the table); a dry run keeps it.
        # Holding the table's lock (``locked``), no other run can be folding it: every fold temp
        # of it is a dead run's, however young; without the lock a young one may be a live fold.
        age = -math.inf if locked else STALE_TEMP_AGE  # any mtime, a share's clock ahead included
        self.stale_temps_removed = sweep_fold_temps(path, min_age=age) if sweep else 0
        shapes = RowShapes()
        mine = ModelRows(facts)
        done = recorded(mine.select(shapes.note(_parquet_rows(path))))
        for task, idents in recorded(mine.select(shapes.note(read_jsonl(self.journal)))).items():
            done.setdefault(task, set()).update(idents)
        mine.report(path)
        super().__init__(facts, done, shapes)
        self._log = LineLog(self.journal)

    def write(self, record: Record, captions: Captions, error: str | None) -> bool:
        new = self._new_captions(record, captions)
        if new:
            self._log.append(row_line(make_row(record, self.facts, new)))
            self._remember(record, new)
        return bool(new)

    def close(self) -> None:
        self._log.close()
        fold_journal(self.path, self.journal)


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def fold_journal(path: Path, journal: Path) -> None:
    """Rewrite ``path`` as its rows plus the journal's, atomically; then drop the journal."""
    rows = list(read_jsonl(journal))
    if not rows:
        journal.unlink(missing_ok=True)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(path)] if path.exists() else []
    if tables:
        rows = _not_folded_yet(tables[0], rows)
        if not rows:  # a run killed after its fold's rename: the journal is in the table already
            journal.unlink()
            return
    tables.append(pa.Table.from_pylist(rows))
    merged = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    try:
        with replacing(path, fold_temp_path(path)) as tmp:
            pq.write_table(merged, tmp)
    except OSError as exc:  # the table is as it was and the journal keeps the rows: say so
        if not is_disk_full(exc):
            raise
        note = f"the table is as it was; its new rows wait in {journal.name} beside it for the next run"
        raise DiskFull(path, exc, note) from exc
    journal.unlink()


def _not_folded_yet(table: Any, rows: list[Any]) -> list[Any]:
    """The journal's ``rows`` that ``table`` does not hold yet.

    A run killed between a fold's rename and the journal's deletion leaves a table that holds
    the journal's rows and the journal too; folding it again would add every row twice. A row is
    never written twice (each image's task once per model), so a journal row equal to one of the
    table's is that one. Only the table's rows of the journal's images are compared, found by
    their source and key (Arrow's own search): a large table is not turned into Python rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not {"source", "key"} <= set(table.column_names):
        return rows
    wanted = pa.array(sorted({f"{row.get('source')}\x00{row.get('key')}" for row in rows}), pa.string())
    names = pc.binary_join_element_wise(table["source"], table["key"], "\x00")
    held = {_row_content(row) for row in table.filter(pc.is_in(names, value_set=wanted)).to_pylist()}
    return [row for row in rows if _row_content(row) not in held]


def _row_content(row: dict[str, Any]) -> str:
    """A row as comparable text; absent and null fields alike (the table has every row's columns)."""
    return json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True, default=str)


def fold_temp_path(path: Path) -> Path:
    """The hidden file a fold writes before it renames it over ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def sweep_fold_temps(path: Path, *, min_age: float = STALE_TEMP_AGE) -> int:
    """Delete the fold temp files (:func:`fold_temp_path`) of ``path`` that a run killed while
    folding left behind; returns how many went.

    A Parquet file of a large dataset is rewritten whole at every fold, so each leftover may be
    as big as the output itself. Only regular files named exactly as a fold of this output names
    them and older than ``min_age`` go (a younger one may be another run's fold in progress,
    unless this run holds the output's lock: then the caller passes ``-math.inf``); an error
    leaves that file alone, as for caption temp files.
    """
    name = re.compile(re.escape(f".{path.name}.") + r"[0-9a-f]{8}\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    removed = remove_stale_files(
        path.parent, names, lambda entry: name.fullmatch(entry) is not None, min_age=min_age
    )
    if removed:
        log.info("removed %d leftover temporary file(s) of a killed fold of %s", removed, path)
    return removed


def output_problem(path: Path) -> str | None:
    """Why an output file cannot be written there, found without making or deleting a file (so
    before its lock is taken, which would make a missing folder and a lock file in it), or None:
    a folder, a missing folder (also where a symlinked output points), an existing file that
    cannot be opened for appending."""
    if path.is_dir():
        return f"{path} is a folder"
    for folder in (path.parent if str(path.parent) else Path("."), path.resolve().parent):
        if not folder.is_dir():
            return f"folder {folder} does not exist; create it first (mkdir -p {shlex.quote(str(folder))})"
    if path.is_file():
        try:
            with path.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            return f"cannot write {path} ({exc.strerror or exc})"
    return None


def check_writable(path: Path) -> str | None:
    """Why an output file cannot be written there (checked before any work), or None: the
    :func:`output_problem`, then a missing file is made and deleted to see that it can be. So
    call it holding the output's lock: another run's output just made could be the one deleted."""
    problem = output_problem(path)
    if problem is not None:
        return problem
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"cannot write {path} ({exc.strerror or exc})"
    if path.stat().st_size == 0 and (not existed or path.suffix.lower() == ".parquet"):
        # The check leaves nothing behind: no empty output from a run that ends before its first
        # row (a model that cannot load, a stop), and no empty, unreadable Parquet file. The file
        # made is deleted, not the name: a symlink to an output still to be written stays one.
        os.unlink(os.path.realpath(path))
    return None


def write_all(
    outputs: Sequence[Output], record: Record, captions: Captions, error: str | None
) -> tuple[bool, str | None]:
    """Give every output its turn, even when one fails: (skipped, why) for the image's report.
    A full disk (:class:`~vision_server.disk_full.DiskFull`) is raised once every output had its
    turn: it is no failure of this image, and the run stops on it.

    Skipped when the model's captions were stored nowhere because every caption file had been
    written meanwhile. A JSONL/Parquet row still written beside a kept caption file holds the
    model's caption of the image, true as ever, so the image counts as captioned then."""
    problem = None
    stored = False
    full: DiskFull | None = None
    for output in outputs:
        try:
            stored = output.write(record, captions, error) or stored
        except DiskFull as exc:
            full = full or exc
        except (ReadOnlyCaption, NotACaptionFile) as exc:  # said as every folder captioner says it
            problem = problem or str(exc)
        except (OSError, UnicodeError) as exc:
            problem = problem or f"cannot write the caption ({exc})"
    if full is not None:  # every image after this one would meet it too: the run stops
        raise full
    problem = problem or error
    if problem is None and captions and not stored:
        return True, WRITTEN_MEANWHILE
    return False, problem


def close_all(outputs: Sequence[Output]) -> bool:
    """Close every output, each on its own: one that fails to close must not cost the others' rows.
    Whether every one closed (a Parquet table whose journal could not be folded in did not)."""
    closed = True
    for output in outputs:
        try:
            output.close()
        except Exception as exc:
            closed = False
            print(f"error: closing an output failed: {exc}", file=sys.stderr)
    return closed
