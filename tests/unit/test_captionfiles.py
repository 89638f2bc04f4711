"""Caption files on disk: the sweep of temp files a killed run left, on real files."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import hidden_names
from tests.support.leftovers import OLD, YOUNG, aged
from vision_server import captionfiles
from vision_server.captionfiles import (
    NotACaptionFile,
    ReadOnlyCaption,
    caption_target_problem,
    file_problem,
    find_images,
    has_caption,
    is_caption_temp,
    list_images,
    remove_stale_temps,
    sweep_stale_temps,
    temp_path,
    write_atomic,
)
from vision_server.gallery.catalog import Catalog


def test_the_temp_names_we_make_are_the_ones_we_sweep(tmp_path: Path) -> None:
    made = {temp_path(tmp_path / "cat.txt").name for _ in range(50)}
    assert all(is_caption_temp(name) for name in made)
    for name in [
        ".vision-caption.0123456789abcdef.tmp.bak",
        "x.vision-caption.0123456789abcdef.tmp",
        ".vision-caption.0123456789ABCDEF.tmp",  # not what token_hex writes
        ".vision-caption.0123456789abcde.tmp",  # 15 hex
        ".vision-caption.0123456789abcdef0.tmp",  # 17 hex
        ".vision-caption.0123456789abcdeg.tmp",
        ".0123456789abcdef.tmp",  # the thumbnail cache's temp name, another owner
        "cat.tmp",
        "cat.txt",
    ]:
        assert not is_caption_temp(name), name


def test_only_old_temp_files_of_ours_are_removed(tmp_path: Path) -> None:
    stale = aged(tmp_path / ".vision-caption.00112233445566ff.tmp", OLD)
    live = aged(tmp_path / ".vision-caption.aabbccddeeff0011.tmp", YOUNG)  # another run writing now
    lookalike = aged(tmp_path / ".vision-caption.00112233445566ff.tmp.keep", OLD)
    user_tmp = aged(tmp_path / "notes.tmp", OLD)
    caption = aged(tmp_path / "cat.txt", OLD)
    folder = tmp_path / ".vision-caption.1111222233334444.tmp"
    folder.mkdir()
    os.utime(folder, (time.time() - OLD,) * 2)
    link = tmp_path / ".vision-caption.5555666677778888.tmp"
    link.symlink_to(caption)
    os.utime(link, (time.time() - OLD,) * 2, follow_symlinks=False)

    assert remove_stale_temps(tmp_path, os.listdir(tmp_path)) == 1
    assert not stale.exists()
    assert live.exists() and lookalike.exists() and user_tmp.exists() and caption.exists()
    assert folder.is_dir() and link.is_symlink()
    assert caption.read_bytes() == b"half a cap"


def test_a_file_that_vanished_is_no_error(tmp_path: Path) -> None:
    gone = ".vision-caption.9999999999999999.tmp"  # listed, then removed by a parallel sweep
    assert remove_stale_temps(tmp_path, [gone]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root may delete from a read-only folder")
def test_a_file_that_cannot_go_is_left_alone(tmp_path: Path) -> None:
    stale = aged(tmp_path / "ro" / ".vision-caption.0000000000000000.tmp", OLD)
    stale.parent.chmod(0o555)
    try:
        assert remove_stale_temps(stale.parent, os.listdir(stale.parent)) == 0
    finally:
        stale.parent.chmod(0o755)
    assert stale.exists()


def test_the_sweep_walks_subfolders_unless_told_not_to(tmp_path: Path) -> None:
    top = aged(tmp_path / ".vision-caption.0000000000000001.tmp", OLD)
    deep = aged(tmp_path / "a" / "b c" / ".vision-caption.0000000000000002.tmp", OLD)
    young = aged(tmp_path / "a" / ".vision-caption.0000000000000003.tmp", 1)
    assert sweep_stale_temps(tmp_path, recursive=False) == 1
    assert not top.exists() and deep.exists()
    assert sweep_stale_temps(tmp_path) == 1
    assert not deep.exists() and young.exists()


def test_the_sweep_skips_hidden_folders_below_the_root_not_a_hidden_root(tmp_path: Path) -> None:
    """``.git`` or ``.cache`` are no part of the dataset (is_hidden): no run writes a caption
    there, and walking a big one is slow. Only folders are pruned: the temps are dot-named."""
    root = tmp_path / ".datasets" / "x"  # a hidden root is read as usual
    swept = [
        aged(root / ".vision-caption.0000000000000001.tmp", OLD),
        aged(root / "sub" / ".vision-caption.0000000000000002.tmp", OLD),
    ]
    kept = [
        aged(root / ".git" / "objects" / ".vision-caption.0000000000000003.tmp", OLD),
        aged(root / "sub" / ".cache" / ".vision-caption.0000000000000004.tmp", OLD),
    ]
    assert sweep_stale_temps(root) == 2
    assert not any(path.exists() for path in swept) and all(path.exists() for path in kept)


@pytest.mark.parametrize("writable", [True, False])
def test_a_writable_gallery_sweeps_its_folder_a_read_only_one_never(tmp_path: Path, writable: bool) -> None:
    root = tmp_path / "dataset"
    aged(root / "sub" / "cat.png", 0, b"not decoded here")
    stale = aged(root / "sub" / ".vision-caption.0123012301230123.tmp", OLD)
    catalog = Catalog(root, writable=writable, page_size=10)
    assert list(catalog.entries()) == ["sub/cat.png"]
    assert stale.exists() is not writable


def test_a_caption_name_too_long_for_the_file_system_is_no_caption(tmp_path: Path) -> None:
    """ENAMETOOLONG names no file: ``has_caption`` must not take it for an unreadable caption
    (skip mode would skip the image as done), and the target check says what to do."""
    target = tmp_path / f"{'x' * 250}.more_detailed_caption.txt"
    assert not has_caption(target)
    assert caption_target_problem(target) == (
        "the name of its caption file (276 bytes) is too long for the file system; "
        "rename the image to a shorter name"
    )
    assert caption_target_problem(tmp_path / "fine.txt") is None
    (tmp_path / "box.txt").mkdir()
    assert caption_target_problem(tmp_path / "box.txt") == "box.txt is a directory, not a caption file"


def test_list_images_reports_a_folder_it_cannot_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the walk may not list is named with its reason, not skipped without a word
    (``os.walk`` drops such errors unless asked). The listing is refused here by a stand-in,
    since root, who runs CI containers, lists a mode-000 folder anyway."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "b.jpg").symlink_to("gone.jpg")
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for recursive in (True, False):
        listing = list_images(tmp_path, recursive=recursive)
        names = [path.relative_to(tmp_path).as_posix() for path in listing.images]
        assert names == (["b.jpg", "ok/a.png"] if recursive else ["b.jpg"])
        assert listing.unlisted == (
            [(tmp_path / "locked", "cannot list folder: permission denied")] if recursive else []
        )
    assert file_problem(tmp_path / "b.jpg") == "broken symlink (points to gone.jpg)"
    assert find_images(tmp_path) == [tmp_path / "ok" / "a.png"]  # the public helper: files only


@pytest.mark.parametrize("recursive", [True, False])
def test_hidden_files_and_folders_below_the_root_are_not_listed(tmp_path: Path, recursive: bool) -> None:
    """Jupyter checkpoints, thumbnail caches, the trash, dot-named files and symlinks are no
    dataset images (kohya-ss skips them too); a hidden root is listed as any other."""
    root = hidden_names.make_tree(tmp_path / ".data")
    listing = list_images(root, recursive=recursive)
    names = [path.relative_to(root).as_posix() for path in listing.images]
    assert names == (list(hidden_names.VISIBLE) if recursive else ["a.png"])
    assert listing.unlisted == []


def test_write_atomic_keeps_an_existing_files_mode_not_its_link_and_refuses_a_read_only_one(
    tmp_path: Path,
) -> None:
    """An atomic write replaces the file, so without care it would reset a shared dataset's
    group-writable caption to the umask and replace a caption the user made read-only (a plain
    ``open(..., "w")`` refuses that one). A symlinked caption becomes a plain file: the file it
    points to (maybe outside the dataset, maybe shared by other captions) is never written."""
    shared = tmp_path / "shared.txt"
    shared.write_text("old", encoding="utf-8")
    shared.chmod(0o664)
    write_atomic(shared, "new")
    assert shared.read_text(encoding="utf-8") == "new" and stat.S_IMODE(shared.stat().st_mode) == 0o664

    store = tmp_path / "store"
    store.mkdir()
    (store / "cat.txt").write_text("old", encoding="utf-8")
    (tmp_path / "cat.txt").symlink_to(store / "cat.txt")
    write_atomic(tmp_path / "cat.txt", "new")
    assert (
        not (tmp_path / "cat.txt").is_symlink()
        and (tmp_path / "cat.txt").read_text(encoding="utf-8") == "new"
    )
    assert (store / "cat.txt").read_text(encoding="utf-8") == "old"

    kept = tmp_path / "kept.txt"
    kept.write_text("hand-written\n", encoding="utf-8")
    kept.chmod(0o444)
    with pytest.raises(ReadOnlyCaption) as refused:
        write_atomic(kept, "new")
    assert str(refused.value) == "kept.txt is read-only; make it writable (chmod u+w) to let it be replaced"
    assert isinstance(refused.value, OSError)  # every folder captioner reports OSError per image
    assert kept.read_text(encoding="utf-8") == "hand-written\n" and stat.S_IMODE(kept.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.txt", "kept.txt", "shared.txt", "store"]


def test_write_atomic_leaves_a_pipe_where_a_caption_goes_and_says_so(tmp_path: Path) -> None:
    """The folder captioners fail such an image when they plan it; the gallery's save and a pipe
    made since a run looked meet this check alone. It replaced the pipe with a caption file."""
    pipe = tmp_path / "cat.txt"
    os.mkfifo(pipe)
    with pytest.raises(NotACaptionFile) as refused:
        write_atomic(pipe, "a cat")
    assert (
        str(refused.value) == "cat.txt is not a regular file (a pipe, socket or device), not a caption file"
    )
    assert isinstance(refused.value, OSError)  # every folder captioner reports OSError per image
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["cat.txt"]  # no temp file left


def test_a_pipe_is_no_caption_and_a_skip_mode_write_refuses_it_in_the_same_words(tmp_path: Path) -> None:
    """A pipe counted as a caption, so one made where a caption belongs while a skip-mode run
    captioned the image had the image skipped as "written meanwhile"; now the write refuses it."""
    pipe = tmp_path / "cat.txt"
    os.mkfifo(pipe)
    assert not has_caption(pipe)
    with pytest.raises(NotACaptionFile) as refused:
        captionfiles.write_new_caption(pipe, "a cat")
    assert str(refused.value) == f"cat.txt {captionfiles.NOT_A_REGULAR_CAPTION}"
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["cat.txt"]  # no temp file left


def test_a_folder_is_no_caption_and_every_write_refuses_it_in_the_planning_words(tmp_path: Path) -> None:
    """A folder made where a caption belongs after the run looked: skip mode took it for a
    caption written meanwhile, and the other modes' rename failed as "[Errno 21] Is a directory"."""
    folder = tmp_path / "cat.txt"
    folder.mkdir()
    assert not has_caption(folder)
    for write in (write_atomic, captionfiles.write_new_caption):
        with pytest.raises(NotACaptionFile) as refused:
            write(folder, "a cat")
        assert (
            str(refused.value)
            == caption_target_problem(folder)
            == "cat.txt is a directory, not a caption file"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["cat.txt"] and not list(folder.iterdir())


@pytest.mark.parametrize("write", [write_atomic, captionfiles.write_new_caption])
def test_a_folder_made_between_the_look_and_the_rename_is_refused_in_the_planning_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Any
) -> None:
    """The rename refused it as a bare "[Errno 21] Is a directory: '.../.vision-caption...'"."""
    target = tmp_path / "cat.txt"
    named = captionfiles.temp_path

    def someone_makes_a_folder_meanwhile(path: Path) -> Path:  # after the look, before the rename
        path.mkdir(exist_ok=True)
        return named(path)

    monkeypatch.setattr(captionfiles, "temp_path", someone_makes_a_folder_meanwhile)
    with pytest.raises(NotACaptionFile) as refused:
        write(target, "a cat")
    assert str(refused.value) == "cat.txt is a directory, not a caption file"
    assert [p.name for p in tmp_path.iterdir()] == ["cat.txt"] and not list(target.iterdir())


def test_write_atomic_replaces_a_link_into_a_read_only_store_with_a_new_files_mode(tmp_path: Path) -> None:
    """git-annex keeps a dataset's files read-only in its store, each name in the dataset a link
    to one. The read-only check and the kept mode looked through the link at the store's file,
    which the write never touches: the caption was refused with advice to chmod the shared store
    file, and a plain read-only target would have made the new caption read-only too."""
    store = tmp_path / ".git" / "annex" / "objects" / "Xy" / "SHA256E-s3--abc.txt"
    store.mkdir(parents=True)
    annexed = store / "SHA256E-s3--abc.txt"
    annexed.write_text("old", encoding="utf-8")
    annexed.chmod(0o444)
    store.chmod(0o555)
    caption = tmp_path / "cat.txt"
    caption.symlink_to(os.path.relpath(annexed, tmp_path))
    new_file = tmp_path / "new.txt"
    new_file.write_text("", encoding="utf-8")
    fresh_mode = stat.S_IMODE(new_file.stat().st_mode)  # what the umask gives a new file
    try:
        write_atomic(caption, "new")
        assert not caption.is_symlink() and caption.read_text(encoding="utf-8") == "new"
        assert stat.S_IMODE(caption.stat().st_mode) == fresh_mode
        write_atomic(caption, "newer")  # not read-only now: the next run may replace it again
        assert caption.read_text(encoding="utf-8") == "newer"
        assert annexed.read_text(encoding="utf-8") == "old" and stat.S_IMODE(annexed.stat().st_mode) == 0o444
    finally:
        store.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "cat.txt", "new.txt"]


def test_a_skip_mode_write_keeps_a_caption_that_appears_between_its_look_and_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.txt"
    named = captionfiles.temp_path

    def someone_saves_meanwhile(path: Path) -> Path:  # after the look, before the write
        path.write_text("saved by hand", encoding="utf-8")
        return named(path)

    monkeypatch.setattr(captionfiles, "temp_path", someone_saves_meanwhile)
    assert captionfiles.write_new_caption(target, "the model's") is False
    assert target.read_text(encoding="utf-8") == "saved by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_a_skip_mode_write_creates_a_missing_caption_and_replaces_an_empty_one(tmp_path: Path) -> None:
    new, empty, kept = tmp_path / "new.txt", tmp_path / "empty.txt", tmp_path / "kept.txt"
    empty.write_text("  \n", encoding="utf-8")
    kept.write_text("mine", encoding="utf-8")
    assert captionfiles.write_new_caption(new, "a cat") is True
    assert captionfiles.write_new_caption(empty, "a dog") is True
    assert captionfiles.write_new_caption(kept, "a bird") is False
    texts = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()}
    assert texts == {"new.txt": "a cat", "empty.txt": "a dog", "kept.txt": "mine"}
