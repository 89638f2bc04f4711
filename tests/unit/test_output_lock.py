"""The lock that keeps a second run out of a JSONL/Parquet output another run is writing.

Two holders in one process conflict as two processes do (``flock`` belongs to the open file),
so the rules can be checked here; tests/system/test_two_runs.py runs two real commands.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.full_disk import small_ext2_disk
from vision_server.output_lock import (
    LockNoRoom,
    LockUnusable,
    OutputBusy,
    OutputLockError,
    holding,
    lock_path,
    remove_lock_file,
)


def test_a_second_holder_is_refused_at_once_naming_the_output_and_gets_it_once_free(tmp_path: Path) -> None:
    jsonl, parquet = tmp_path / "captions.jsonl", tmp_path / "captions.parquet"
    with holding([jsonl]):
        with pytest.raises(OutputBusy) as refused, holding([parquet, jsonl]):
            pass
        assert refused.value.output == jsonl
        assert "captions.jsonl is being written by another run" in str(refused.value)
        assert ".captions.jsonl.lock" in str(refused.value)
        with holding([parquet]):  # the refused one let go of the lock it had taken
            pass
    with holding([jsonl, parquet]) as locked:  # free again once the first holder is done
        assert locked == {jsonl, parquet}  # held: their temp files are no live run's
    assert not jsonl.exists() and not parquet.exists()  # the outputs themselves are not touched


def test_every_spelling_of_one_output_shares_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "data" / "captions.jsonl"
    real.parent.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    monkeypatch.chdir(real.parent)
    assert lock_path(Path("captions.jsonl")) == lock_path(link) == real.parent / ".captions.jsonl.lock"
    with holding([link]), pytest.raises(OutputBusy):
        with holding([Path("./captions.jsonl")]):
            pass


def test_a_lock_file_that_cannot_be_made_is_warned_about_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An existing output in a folder this user may not write to: appending to it works, a lock
    # file beside it cannot be made. (Root writes anywhere: the check then runs as nobody.)
    with readable_folder() as folder:
        output = folder / "ro" / "captions.jsonl"
        output.parent.mkdir()
        output.write_text("", encoding="utf-8")
        output.chmod(0o666)
        output.parent.chmod(0o555)
        with as_another_user(), caplog.at_level(logging.WARNING, logger="vision_server.output_lock"):
            with holding([output]) as locked:
                assert locked == frozenset()  # not held: another run may be writing it
    assert "cannot create the lock file" in caplog.text and "nothing stops another run" in caplog.text
    assert "Permission denied" in caplog.text


def test_a_full_disk_with_no_room_for_the_lock_file_says_so_not_remove_it(tmp_path: Path) -> None:
    # A disk without a free inode takes no new file, not even an empty one: the run stops
    # naming the full disk. (It said the lock file "cannot be made (No space left on device)"
    # and to remove it, which is not there.)
    with small_ext2_disk(tmp_path / "disk") as disk:
        output = disk / "data" / "captions.jsonl"
        output.parent.mkdir()
        output.write_text("", encoding="utf-8")
        (disk / "fill").mkdir()
        with pytest.raises(OSError) as full:  # every inode taken
            for number in range(100_000):
                (disk / "fill" / str(number)).touch()
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(LockNoRoom) as refused, holding([output]):
            pass
    message = str(refused.value)
    assert message == (
        f"cannot lock {output}: no room for its lock file .captions.jsonl.lock (no space left on the "
        "device); free some space there, then run this command again"
    )


@pytest.mark.parametrize("kind", ["dangling link", "folder"])
def test_a_lock_file_in_the_way_stops_the_run_naming_it_not_another_run(tmp_path: Path, kind: str) -> None:
    # filelock may say "timeout" for a lock file it cannot open (by version and system), or give
    # up with an OSError: either was taken for another run holding it, or the run went on with
    # no lock at all. Only a lock another process holds is "another run".
    output = tmp_path / "captions.jsonl"
    lock = tmp_path / ".captions.jsonl.lock"
    if kind == "dangling link":
        lock.symlink_to(tmp_path / "gone" / "x.lock")
        said, remove = f"is a symbolic link (to {tmp_path / 'gone' / 'x.lock'})", "rm"
    else:
        lock.mkdir()
        said, remove = "is a folder", "rmdir"
    with pytest.raises(LockUnusable) as refused, holding([output]):
        pass
    message = str(refused.value)
    assert "another run" not in message
    assert f"cannot lock {output}: its lock file {lock} {said}, not a lock file a run made" in message
    assert f"If no run is writing {output}, remove it ({remove} {lock}) and run this command again" in message
    assert isinstance(refused.value, OutputLockError) and not output.exists()


def test_a_lock_file_this_user_may_not_open_is_named_not_taken_for_another_run() -> None:
    # Left by another user's run in a shared folder, say: no run may hold it, none could take it.
    with readable_folder() as folder:
        output = folder / "captions.jsonl"
        lock = folder / ".captions.jsonl.lock"
        lock.touch()
        lock.chmod(0)  # (its owner would have to give it read or write permission first)
        with as_another_user(), pytest.raises(LockUnusable) as refused, holding([output]):
            pass
    message = str(refused.value)
    assert f"its lock file {lock} cannot be opened (Permission denied)" in message
    assert f"remove it (rm {lock})" in message and "another run" not in message


@contextlib.contextmanager
def readable_folder() -> Iterator[Path]:
    """A new folder every user may enter (pytest's own are the creator's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="lock-test-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        for entry in folder.rglob("*"):
            if entry.is_dir() and not entry.is_symlink():
                entry.chmod(0o755)
        shutil.rmtree(folder)


@contextlib.contextmanager
def as_another_user() -> Iterator[None]:
    """Permissions as an ordinary user meets them: as ``nobody`` while root (root opens and
    writes anything), as oneself otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_lock_file_another_user_left_is_locked_through_reading_it() -> None:
    # Every Unix run leaves its lock file, with its owner's mode: the next user's run on a shared
    # dataset may read it but not write it. flock needs no write permission: that run holds the
    # lock (it was refused, told to delete another user's file), and a third is refused while it does.
    with readable_folder() as folder:
        output = folder / "captions.jsonl"
        with holding([output]):  # the first user's run
            pass
        lock = folder / ".captions.jsonl.lock"
        lock.chmod(0o444)  # theirs: this user may read it, not write it
        with as_another_user():
            with holding([output]) as locked:
                assert locked == {output}
                with pytest.raises(OutputBusy), holding([output]):
                    pass
            with holding([output]) as locked:  # let go when the run ended
                assert locked == {output}


@pytest.mark.skipif(os.name == "nt", reason="Windows deletes its lock files when it lets go")
def test_a_run_knows_the_lock_files_it_made_and_may_take_them_away_while_held(tmp_path: Path) -> None:
    """``made`` names only a lock file that was not there before; removed while held, the name
    is free for the next run, which makes and locks a new file; one made earlier is not noted."""
    output = tmp_path / "out"
    made: list[Path] = []
    with holding([output], made):
        assert made == [lock_path(output)]
        remove_lock_file(made[0])
        assert not lock_path(output).exists()
    later: list[Path] = []
    with holding([output], later), holding([tmp_path / "other"]):
        assert later == [lock_path(output)] and lock_path(output).is_file()
        with pytest.raises(OutputBusy):  # the new file is locked as any
            with holding([output]):
                pass
    again: list[Path] = []
    with holding([output], again):
        assert again == []  # the lock file of the run before: not this run's to take away
