"""The gallery's file rules: which client paths are acceptable, which files are captions, JSONL rows."""

from __future__ import annotations

import fnmatch
import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.support import paths
from vision_server.bounded_files import read_at_most
from vision_server.errors import PayloadTooLarge
from vision_server.gallery.jsonl import JsonlCaptions, row_captions, row_key
from vision_server.gallery.paths import is_clean_relative
from vision_server.gallery.sidecars import TextCache, is_caption_suffix, sidecars_of
from vision_server.settings import Settings, SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize("text", ["a.png", "sub/a.png", "a b/ç.png", "..a.png", "a..png", "%2e%2e/a.png"])
def test_clean_relative_paths(text: str) -> None:
    assert is_clean_relative(text)


@pytest.mark.parametrize(
    "text",
    ["", "..", "../a.png", "sub/../a.png", "sub/..", "/a.png", "./a.png", "sub//a.png", "sub/", "a\\b.png",
     "..\\a.png", "C:/a.png", "c:a.png", "a.png\x00", "sub/./a.png"],
)  # fmt: skip
def test_paths_that_could_step_outside_are_refused(text: str) -> None:
    assert not is_clean_relative(text)


def test_caption_files_of_an_image() -> None:
    names = ["cat.png", "cat.txt", "cat.tags", "cat.generate_tags.txt", "cat.jpg", "cat.json", "catalog.txt",
             "cat.caption", "cat.v2.png", "dog.txt", "cat.a b.txt"]  # fmt: skip
    assert sidecars_of("cat.png", names) == (".txt", ".caption", ".generate_tags.txt", ".tags")
    assert sidecars_of("dog.png", names) == (".txt",)
    assert is_caption_suffix(".txt") and is_caption_suffix(".more_detailed_caption.txt")
    assert (
        not is_caption_suffix(".png") and not is_caption_suffix("/../x.txt") and not is_caption_suffix("txt")
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_named_like_a_caption_is_no_caption(tmp_path: Path) -> None:
    """Opening a FIFO waits for a writer: the gallery (one lock for its file work) hung for good."""
    fifo = tmp_path / "cat.txt"
    os.mkfifo(fifo)
    (tmp_path / "dog.txt").write_text("a dog", encoding="utf-8")
    texts: list[str | None] = []
    reader = threading.Thread(
        target=lambda: texts.extend(TextCache().read(p) for p in (fifo, tmp_path / "dog.txt"))
    )
    reader.daemon = True  # on the old code it never returns; the test must fail, not hang
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():
        with open(fifo, "w"):  # let the stuck reader go
            pass
        pytest.fail("reading a FIFO named like a caption file blocked")
    assert texts == [None, "a dog"]


def test_jsonl_rows_of_both_shapes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    bulk = {"source": str(root), "key": "sub/a.png", "task": "<CAPTION>", "caption": "one"}
    several = {
        "key": "b.png",
        "tasks": ["<CAPTION>", "<GENERATE_TAGS>"],
        "caption": "two",
        "generate_tags": "t",
    }
    metadata = {"file_name": "c.png", "text": "three"}
    assert row_key(bulk, root, root) == "sub/a.png" and row_captions(bulk) == {"jsonl <CAPTION>": "one"}
    assert row_captions(several) == {"jsonl <CAPTION>": "two", "jsonl <GENERATE_TAGS>": "t"}
    assert row_key(metadata, root, root) == "c.png" and row_captions(metadata) == {"jsonl": "three"}
    assert row_key({"path": str(root / "d.png")}, root, root) == "d.png"
    assert row_key({"path": "/elsewhere/d.png"}, root, root) is None
    assert row_captions({"key": "e.png", "caption": None, "error": "broken"}) == {}


def test_every_file_of_the_page_is_package_data() -> None:
    config = tomllib.loads((paths.REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["vision_server.ui"]
    folder = paths.REPO / "vision_server" / "ui"
    files = [p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".py"]
    assert {"index.html", "app.js", "app.css"} <= set(files)
    assert [name for name in files if not any(fnmatch.fnmatch(name, p) for p in patterns)] == []


def test_a_gallery_jsonl_needs_a_gallery(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="gallery_jsonl"):
        Settings(gallery_jsonl=tmp_path / "captions.jsonl")


def test_read_at_most_reads_up_to_the_limit_and_refuses_more(tmp_path: Path) -> None:
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"x" * 100)
    assert read_at_most(exact, 100, "--max-request-bytes") == b"x" * 100
    with pytest.raises(PayloadTooLarge, match=r"is 100 B, over the 99 B an image may be \(--limit\)"):
        read_at_most(exact, 99, "--limit")
    just_over = tmp_path / "just-over.png"
    with just_over.open("wb") as file:
        file.truncate(2**20 + 1)  # sparse
    with pytest.raises(PayloadTooLarge, match=r"is 1048577 bytes, over the 1048576 bytes an image may be"):
        read_at_most(just_over, 2**20, "--limit")
    with pytest.raises(OSError, match="not a regular file"):
        read_at_most(tmp_path, 100, "--limit")


class AppendedOnOpen(type(Path())):  # type: ignore[misc]
    """A real file that another program appends ``extra`` bytes to between the size check
    (``stat``) and the read (``open``), as a download or a recording still being written does;
    ``taken`` counts the bytes the reader got."""

    extra = b""
    taken = 0

    def open(self, *args: object, **kwargs: object) -> object:
        with open(os.fspath(self), "ab") as writer:
            writer.write(self.extra)
        return _Counted(super().open(*args, **kwargs))


class _Counted:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        AppendedOnOpen.taken += len(data)
        return data


def test_read_at_most_refuses_a_file_that_grows_past_the_limit_while_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "growing.png").write_bytes(b"x" * 90)  # under the limit when its size is checked
    AppendedOnOpen.extra, AppendedOnOpen.taken = b"y" * 2**20, 0
    grew = r"the file grew over the 100 B an image may be \(--limit\) while it was read"
    with pytest.raises(PayloadTooLarge, match=grew):
        read_at_most(AppendedOnOpen(tmp_path / "growing.png"), 100, "--limit")
    assert (tmp_path / "growing.png").stat().st_size == 90 + 2**20  # it did grow ...
    assert AppendedOnOpen.taken == 101  # ... and the read stopped one byte past the limit
    (tmp_path / "still-fits.png").write_bytes(b"x" * 50)
    AppendedOnOpen.extra = b"y" * 50  # grows to the limit exactly: read as it is now
    assert read_at_most(AppendedOnOpen(tmp_path / "still-fits.png"), 100, "--limit") == b"x" * 50 + b"y" * 50


def replace_keeping_time(path: Path, text: str, mtime_ns: int) -> None:
    """Write ``text`` to a new file renamed over ``path`` with the mtime ``mtime_ns``, as a clock
    that moved less than a tick, or an archive that keeps times, leaves it."""
    new = path.with_name(path.name + ".new")
    new.write_text(text, encoding="utf-8")
    os.utime(new, ns=(mtime_ns, mtime_ns))
    os.replace(new, path)


def test_a_caption_replaced_by_one_of_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    """Keyed on size and mtime only, the gallery showed the old caption until it restarted."""
    caption = tmp_path / "dog.txt"
    caption.write_text("a red dog", encoding="utf-8")
    cache = TextCache()
    assert cache.read(caption) == "a red dog"
    replace_keeping_time(caption, "a big cat", caption.stat().st_mtime_ns)
    assert cache.read(caption) == "a big cat"


def test_a_gallery_jsonl_replaced_by_one_of_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"key": "a.png", "caption": "a red dog"}\n', encoding="utf-8")
    captions = JsonlCaptions(jsonl, tmp_path)
    assert captions.captions() == {"a.png": {"jsonl": "a red dog"}}
    replace_keeping_time(jsonl, '{"key": "a.png", "caption": "a big cat"}\n', jsonl.stat().st_mtime_ns)
    assert captions.captions() == {"a.png": {"jsonl": "a big cat"}}
