"""A JSON Lines caption log: one ``{"file", "task", "caption", "model"}`` object per line, appended.

``model`` is the served model that answered, as the server named it (null when it did not say).
Resuming goes by ``file`` and ``task``; a run that names its model (``--model``) also goes by
``model``, so captions of another model, or of a server that did not say, are not taken for its own.

It is both the output and the record a later run resumes from: one file can hold several tasks
for the same images, and a line is only written once its caption is complete. A run killed
mid-line leaves a broken last line, which the reader ignores and the writer terminates first.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

from vision_server.bulk.records import safe_text
from vision_server.client.api import task_token
from vision_server.line_logs import LineLog


def captioned_files(path: Path, task: str, model: str | Collection[str] | None = None) -> set[str]:
    """The ``file`` values already recorded for ``task`` (spelled any way), and for ``model``
    (exactly as the server named it in the row; any of several names) when one is given."""
    models = (model,) if isinstance(model, str) else None if model is None else tuple(model)
    wanted = task_token(task)
    done: set[str] = set()
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return done
    with handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(record, dict)
                and isinstance(record.get("file"), str)
                and isinstance(record.get("caption"), str)
                and isinstance(record.get("task"), str)
                and task_token(record["task"]) == wanted
                and (models is None or record.get("model") in models)
            ):
                done.add(_as_written(record["file"]))
    return done


def _as_written(file: str) -> str:
    """A row's ``file`` as this version writes it: the bytes of a name that is not UTF-8 as
    ``\\xNN`` (:func:`~vision_server.bulk.records.safe_text`, the spelling of ``vision-server
    caption``); earlier versions wrote them as ``\\udcXX`` escapes, which JSON reads back as
    surrogates, and such rows still count."""
    try:
        return safe_text(file)
    except UnicodeEncodeError:  # a surrogate no file name decodes to: no image has that key
        return file


def record_line(file: str, task: str, caption: str, model: str | None = None) -> str:
    """One line of the log; non-ASCII stays readable unless a text is not valid Unicode (the
    folder run writes file names already made so, as ``\\xNN``)."""
    record = {"file": file, "task": task, "caption": caption, "model": model}
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, as JSON may carry them in a caption
        line = json.dumps(record)
    return line + "\n"


class JsonlWriter:
    """Appends records, each line whole or not at all (:class:`~vision_server.line_logs.LineLog`),
    so a crash or a full disk loses at most the line in progress, and never leaves half of it.
    Its folder must exist (:func:`~vision_server.client.folder.caption_folder` refuses a missing
    one, more often a typo than a wish, before anything is sent): none is made here."""

    def __init__(self, path: Path) -> None:
        self._log = LineLog(path)
        self._log.open()  # created now, a torn last line of a killed run terminated

    def write(self, file: str, task: str, caption: str, model: str | None = None) -> None:
        self._log.append(record_line(file, task, caption, model))

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
