"""What flows between the stages of the dataset captioner; all of it is small and picklable."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vision_server.captionfiles import printable


@dataclass(frozen=True)
class Record:
    """One image to caption, as a reader found it.

    ``source`` is the input it came from (a folder, list, Parquet file or tar shard, or the
    image itself) and ``key`` names it inside that input: a path relative to the folder, the
    line of a list, a Parquet key column or row number, a WebDataset ``__key__``. Together they
    identify the image in JSONL and Parquet outputs, which is what a rerun resumes from.
    """

    source: str
    key: str
    path: Path | None = None  # the image file; sidecars go beside it (None: bytes from a table/tar)
    data: bytes | None = field(default=None, repr=False)  # the image bytes when there is no file
    error: str | None = None  # the reader already knows this one cannot be captioned, and why
    # the other images of its folder with the same stem (in any case, where the file system folds
    # case): they would share its caption file
    stem_clash: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        """How reports name it: the file path, or ``source#key`` for images inside a file.

        Control characters (a line break or tab in a file name) are escaped, so each report is
        one line and the dry run's ``word TAB path TAB detail`` lines stay three fields.
        """
        text = str(self.path) if self.path is not None else f"{self.source}#{self.key}"
        return printable(text)


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: bytes of non-UTF-8 file names become ``\\xNN`` escapes.

    On POSIX a file name may be any bytes; Python keeps the undecodable ones as surrogates,
    which JSON, Parquet and terminals refuse. Every row and message uses this spelling, so a
    rerun recognises the same name again.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def task_slug(task: str) -> str:
    """``<GENERATE_TAGS>`` → ``generate_tags``: the sidecar infix and the row field of a task."""
    return task.strip("<>").lower()
