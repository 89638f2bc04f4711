"""One run at a time per shared output file: an exclusive lock held for the whole run.

A JSONL file or a Parquet table (with its journal and fold) is one file that every row of a run
goes into. Two runs writing the same one at once both caption every image (each resumed from
what it read at its start), so the file gets each row twice; and a Parquet run that folds its
journal into the table deletes the journal the other run is still appending to, whose later rows
are lost. So a run takes a lock on each such output before it reads it back, and a second run
that finds it held stops at once, before any work, naming the file.

The lock is ``fcntl.flock`` on Unix and a Windows file lock (both through ``filelock``) on a
hidden ``.NAME.lock`` file beside the output. The system drops it when the process ends, however
it ends (``kill -9`` included), so a crashed run never leaves a stale lock. On Unix the empty
lock file stays (``filelock`` deletes it on Windows only): deleting it on release would let a
run that opened it just before lock a file no other run can find. Standard library and
``filelock`` only: the client takes the same lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


class OutputBusy(Exception):
    """Another run holds the lock of an output this run would write."""

    def __init__(self, output: Path, lock: Path) -> None:
        super().__init__(
            f"{output} is being written by another run (it holds the lock {lock.name} beside it, on this "
            "machine or another one sharing the folder). Two runs into one file would caption every "
            "image twice and could lose rows; let that run finish and run this command again to do what "
            "it left, or write to another file."
        )
        self.output = output
        self.lock = lock


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: hidden, beside it, named after it. Found through the resolved
    path, so ``out.jsonl``, ``./out.jsonl``, its absolute path and a symlink to it share one lock."""
    real = output.resolve()
    return real.with_name(f".{real.name}.lock")


@contextmanager
def holding(outputs: list[Path]) -> Iterator[None]:
    """Hold the lock of each of ``outputs`` until the block ends; raise :class:`OutputBusy` at
    once (without waiting) when another run holds one of them, after letting go of those taken.

    A lock file that cannot be created (an existing output in a folder this user may not write)
    is warned about, and the run goes on unprotected: appending to such a JSONL file works.
    """
    taken: list[FileLock] = []
    try:
        for output in outputs:
            lock = FileLock(lock_path(output), timeout=0, thread_local=False)
            try:
                lock.acquire()
            except Timeout:
                raise OutputBusy(output, lock_path(output)) from None
            except OSError as exc:
                log.warning(
                    "cannot create the lock file %s (%s): nothing stops another run from writing %s "
                    "at the same time",
                    lock_path(output),
                    exc.strerror or exc,
                    output,
                )
                continue
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()
