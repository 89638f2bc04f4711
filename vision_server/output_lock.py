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
run that opened it just before lock a file no other run can find. (A training run that stops
before writing anything takes away the one it made, while still holding it: see
:func:`remove_lock_file`.) Another user's run may then
find it not writable: it is locked through reading it, which ``flock`` allows. Standard library and
``filelock`` only: the client takes the same lock.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from vision_server.disk_full import is_disk_full, no_space_reason

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

log = logging.getLogger(__name__)

# What a folder answers when it takes no new file, or a share that has no locks at all: the run
# goes on without the lock, warned (an existing output there may still be appended to).
_NO_LOCKS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
# What a lock taken without waiting answers when another open of the file holds it (EACCES on
# Windows and some Unix file systems).
_HELD = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


class OutputLockError(Exception):
    """This run may not write an output: its lock is held, or cannot be used. Either way the run
    stops before any work, naming the output and the lock file."""

    def __init__(self, message: str, output: Path, lock: Path) -> None:
        super().__init__(message)
        self.output = output
        self.lock = lock


class OutputBusy(OutputLockError):
    """Another run holds the lock of an output this run would write."""

    def __init__(self, output: Path, lock: Path) -> None:
        super().__init__(
            f"{output} is being written by another run (it holds the lock {lock.name} beside it, on this "
            "machine or another one sharing the folder). Two runs into one file would caption every "
            "image twice and could lose rows; let that run finish and run this command again to do what "
            "it left, or write to another file.",
            output,
            lock,
        )


class LockUnusable(OutputLockError):
    """The lock file of an output is something no run could lock (a link, a folder, a file this
    user may not open): no run holds it, and none could, until it is taken away."""

    def __init__(self, output: Path, lock: Path, problem: str) -> None:
        remove = "rmdir" if lock.is_dir() and not lock.is_symlink() else "rm"
        super().__init__(
            f"cannot lock {output}: its lock file {lock} {problem}. If no run is writing {output}, "
            f"remove it ({remove} {shlex.quote(str(lock))}) and run this command again, or write to "
            "another file.",
            output,
            lock,
        )


class LockNoRoom(OutputLockError):
    """The disk holding an output has no room for its (empty) lock file: no free inode or
    directory block. Nothing is in the way to remove, unlike :class:`LockUnusable`."""

    def __init__(self, output: Path, lock: Path, cause: OSError) -> None:
        super().__init__(
            f"cannot lock {output}: no room for its lock file {lock.name} ({no_space_reason(cause)}); "
            "free some space there, then run this command again",
            output,
            lock,
        )


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: hidden, beside it, named after it. Found through the resolved
    path, so ``out.jsonl``, ``./out.jsonl``, its absolute path and a symlink to it share one lock."""
    real = output.resolve()
    return real.with_name(f".{real.name}.lock")


@contextmanager
def holding(outputs: list[Path], made: list[Path] | None = None) -> Iterator[frozenset[Path]]:
    """Hold the lock of each of ``outputs`` until the block ends; raise :class:`OutputBusy` at
    once (without waiting) when another run holds one of them, or :class:`LockUnusable` when its
    lock file is in the way, after letting go of those taken.

    Yields those of ``outputs`` (as given) whose lock this run holds: while it does, no other run
    writes them, so a temp file of theirs is a dead run's, however young (its sweep need not wait).

    ``made``, when given, gets the lock files that did not exist before this call took them: a
    start that fails before writing anything may take them away again (:func:`remove_lock_file`,
    while the block still holds them).

    Each output's folder must exist: ``filelock`` would make it (the caller refuses a missing
    one first). A lock file that cannot be created where the folder takes no new file (an
    existing output in a folder this user may not write) or on a share without locks is warned
    about, and the run goes on unprotected: appending to such a JSONL file works.
    """
    taken: list[FileLock] = []
    read_locks: list[int] = []  # descriptors of lock files locked through reading them
    locked: list[Path] = []
    try:
        for output in outputs:
            path = lock_path(output)
            existed = os.path.lexists(path)
            lock = FileLock(path, timeout=0, thread_local=False)
            try:
                lock.acquire()
            except (Timeout, OSError) as failure:
                # filelock says Timeout for a lock another process holds, but also (by version
                # and system) for a lock file it could not open; and OSError for either: look.
                try:
                    read_locks.append(_lock_by_reading(output, path, failure))
                except _NoLocksHere as exc:
                    log.warning(
                        "cannot create the lock file %s (%s): nothing stops another run from writing %s "
                        "at the same time",
                        path,
                        exc.reason,
                        output,
                    )
                    continue
            else:
                taken.append(lock)
            locked.append(output)
            if made is not None and not existed:
                made.append(path)
        yield frozenset(locked)
    finally:
        for lock in reversed(taken):
            lock.release()
        for fd in read_locks:
            os.close(fd)  # the lock goes with it


def remove_lock_file(path: Path) -> None:
    """Take away the lock file ``path`` that this run made and still holds (see ``made`` in
    :func:`holding`), so a run that stopped before writing anything leaves no trace.

    Removed while held: a run that opens it meanwhile finds the lock taken, or (opened just
    before, locked just after this run lets go) the file unlinked, which the lock takers check
    (:func:`_lock_by_reading`; ``filelock`` 4 does the same), so it looks again and makes a new
    one. From then on another run may lock a new file of that name, so this is the run's last
    act before it lets go. On Windows ``filelock`` deletes the file when it lets go: nothing to
    do there. A file that cannot be removed stays: harmless."""
    if sys.platform == "win32":
        return
    with suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink()


class _NoLocksHere(Exception):
    """No lock can be had where the output is (a folder that takes no new file, a share without
    locks), though nothing is in the way: the run goes on unprotected."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.reason = error.strerror or str(error)


def _lock_by_reading(output: Path, path: Path, failure: BaseException, tries: int = 3) -> int:
    """One look at the lock file ``path`` after ``filelock`` could not take it (``failure``): the
    lock taken through a descriptor opened for reading, returned and held until it is closed; or
    why not, as the run should take it: :class:`OutputBusy` when another process holds it (the one
    case where waiting for that run is the answer), :class:`LockUnusable` saying what is in the
    way, :class:`_NoLocksHere` when nothing is in the way but no lock can be had there.

    Every Unix run leaves its lock file behind, with its owner's mode (``rw-r--r--``): the next
    run of another user on a shared dataset cannot open it for writing, as ``filelock`` does, but
    ``flock`` needs no write permission, so it locks it all the same. (A lock that another run
    released a moment ago is taken here too.) Windows deletes its lock files: there the look only
    says why ``filelock`` failed, and a lock it does take goes with its descriptor at once."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            _make(path, failure)  # raises _NoLocksHere, or made it: now looked at as any
            info = os.lstat(path)
        except OSError as exc:
            if is_disk_full(exc):
                raise LockNoRoom(output, path, exc) from None
            raise LockUnusable(output, path, f"cannot be made ({_reason(exc)})") from None
    except OSError as exc:
        raise LockUnusable(output, path, f"cannot be looked at ({_reason(exc)})") from None
    if stat.S_ISLNK(info.st_mode):
        problem = f"is a symbolic link (to {os.readlink(path)}), not a lock file a run made"
        raise LockUnusable(output, path, problem) from None
    if stat.S_ISDIR(info.st_mode):
        raise LockUnusable(output, path, "is a folder, not a lock file a run made") from None
    if not stat.S_ISREG(info.st_mode):
        raise LockUnusable(output, path, _NOT_PLAIN) from None
    try:
        # Not following a link, nor waiting on a pipe, put there since the look above.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise LockUnusable(output, path, f"cannot be opened ({_reason(exc)})") from None
    keep = gone = False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LockUnusable(output, path, _NOT_PLAIN) from None
        if not _take(fd):
            raise OutputBusy(output, path) from None
        # Unlinked between the open and the lock (a run that made it took it away as it let go,
        # remove_lock_file): a lock on a file no other run can find is none; look again.
        gone = os.fstat(fd).st_nlink == 0 and tries > 1
        keep = sys.platform != "win32" and not gone
    except OSError as exc:
        raise LockUnusable(output, path, f"cannot be locked ({_reason(exc)})") from None
    finally:
        if not keep:
            os.close(fd)
    if gone:
        return _lock_by_reading(output, path, failure, tries - 1)
    if keep:
        return fd
    raise LockUnusable(output, path, f"could not be locked ({_reason(failure)})") from None


_NOT_PLAIN = "is not a plain file, not a lock file a run made"


def _reason(error: BaseException) -> str:
    """An error as said in brackets after what failed: its system text where it has one."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _make(path: Path, failure: BaseException) -> None:
    """Make the missing lock file ``path`` (as filelock would); raise :class:`_NoLocksHere` when
    the folder takes no new file, or the error that says why it cannot be made."""
    if isinstance(failure, OSError) and failure.errno in _NO_LOCKS:
        raise _NoLocksHere(failure)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        pass  # made meanwhile (another run): looked at next
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            raise _NoLocksHere(exc) from None
        raise


def _take(fd: int) -> bool:
    """Whether the lock of the open file ``fd`` was taken (a lock of the same kind as filelock's),
    trying without waiting; False when another open of the file holds it. Taken, it goes when
    ``fd`` is closed. Raises :class:`_NoLocksHere` where the file system has no locks."""
    try:
        if sys.platform == "win32":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD:
            return False
        if exc.errno in _NO_LOCKS:
            raise _NoLocksHere(exc) from None
        raise
    return True
