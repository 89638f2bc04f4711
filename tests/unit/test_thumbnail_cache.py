"""The gallery's thumbnail cache on real files: its size cap, least recently used first, and
the leftovers of a crash."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tests.support.images import image_bytes
from tests.support.leftovers import OLD, YOUNG, aged
from vision_server.gallery.thumbs import ThumbnailError, Thumbnails, make_thumbnail
from vision_server.settings import Settings, SettingsError

PIXELS = 64_000_000


def same_images(root: Path, count: int) -> list[Path]:
    """``count`` files with the same picture, so every thumbnail has the same size."""
    data = image_bytes(3, "PNG", (300, 200))
    paths = [root / f"img{n}.png" for n in range(count)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return paths


def cached(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def thumb_of(cache: Thumbnails, folder: Path, image: Path) -> Path:
    """The cache file of ``image``: the one that appears when it is made."""
    before = set(cached(folder))
    cache.get(image)
    (new,) = set(cached(folder)) - before
    return new


def set_age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_over_the_cap_the_least_recently_shown_go_first(tmp_path: Path) -> None:
    images = same_images(tmp_path / "data", 5)
    size = len(make_thumbnail(images[0], PIXELS))
    folder = tmp_path / "thumbs"
    roomy = Thumbnails(folder, PIXELS, 10**9)
    files = [thumb_of(roomy, folder, image) for image in images[:4]]
    for file, age in zip(files, (400, 300, 200, 100), strict=True):
        set_age(file, age)
    assert roomy.get(images[0]) == files[0].read_bytes()  # shown again: now the most recent
    assert files[0].stat().st_mtime > time.time() - 60

    tight = Thumbnails(folder, PIXELS, 3 * size + 1)  # a restart with a smaller cap
    tight.get(images[4])
    left = cached(folder)
    assert files[1] not in left and files[2] not in left  # the two least recently used
    assert files[0] in left and files[3] in left and len(left) == 3
    assert sum(path.stat().st_size for path in left) <= 3 * size + 1

    tight.get(images[1])  # made again: over the cap once more, so down to 90 % of it
    left = cached(folder)
    assert files[3] not in left and files[1] in left and len(left) == 2  # the oldest went first


def test_pruning_runs_when_the_running_total_passes_the_cap_not_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = same_images(tmp_path / "data", 6)
    size = len(make_thumbnail(images[0], PIXELS))
    cache = Thumbnails(tmp_path / "thumbs", PIXELS, 4 * size + 1)
    passes: list[int] = []
    scan = cache._scan

    def counted(now: float) -> tuple[list[tuple[float, int, Path]], int]:
        passes.append(1)
        return scan(now)

    monkeypatch.setattr(cache, "_scan", counted)
    for image in images[:4]:
        cache.get(image)
        cache.get(image)  # a hit
    assert len(passes) == 1  # the first use counts what is there; four writes stay under the cap
    cache.get(images[4])
    assert len(passes) == 2 and len(cached(tmp_path / "thumbs")) == 3  # down to 90 % of the cap


def test_crash_leftovers_go_and_nothing_else_is_touched(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "gallery-thumbs"
    stale = aged(folder / "ab" / ".0123456789abcdef.tmp", OLD)
    writing = aged(folder / "ab" / ".fedcba9876543210.tmp", YOUNG)  # another server writing now
    foreign = [
        aged(folder / "notes.txt", OLD),
        aged(folder / "ab" / "mine.jpg", OLD),
        aged(folder / "models" / ("c" * 64 + ".jpg"), OLD),  # not a shard folder of ours
    ]
    pruned = Thumbnails(folder, PIXELS, 0).prune()
    assert (pruned.removed, pruned.temps) == (0, 1)
    assert not stale.exists() and writing.exists() and all(path.exists() for path in foreign)


def test_a_cap_of_zero_keeps_nothing_on_disk(tmp_path: Path) -> None:
    images = same_images(tmp_path / "data", 2)
    folder = tmp_path / "thumbs"
    thumb_of(Thumbnails(folder, PIXELS), folder, images[0])
    none = Thumbnails(folder, PIXELS, 0)
    assert none.get(images[1])[:2] == b"\xff\xd8"  # still a JPEG
    assert none.get(images[0]) == make_thumbnail(images[0], PIXELS)
    assert cached(folder) == []  # the earlier cache went too


def test_the_setting_takes_sizes_as_people_write_them(tmp_path: Path) -> None:
    assert Settings().thumbnail_cache_bytes == 1024**3
    assert Settings(thumbnail_cache_size="512MB").thumbnail_cache_bytes == 512_000_000
    assert Settings(thumbnail_cache_size="2GiB").thumbnail_cache_bytes == 2 * 1024**3
    assert Settings(thumbnail_cache_size="0").thumbnail_cache_bytes == 0
    for bad in ("-1", "lots", ""):
        with pytest.raises(SettingsError, match="thumbnail_cache_size"):
            Settings(thumbnail_cache_size=bad)


def odd_name(folder: Path, stem: bytes) -> Path:
    """``folder / stem.png`` with a name that is not UTF-8 (skips where names must be)."""
    path = folder / os.fsdecode(stem + b".png")
    try:
        path.touch()
        path.unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    return path


def test_an_image_that_cannot_be_read_is_said_in_words_not_as_a_python_repr(tmp_path: Path) -> None:
    """The reason used to be the OSError's str(): Python's repr of the absolute path, quotes and
    ``\\udce9`` escapes included, after a name the route had already given the readable way."""
    folder = odd_name(tmp_path, b"caf\xe9 it's\nhere")
    folder.mkdir()  # listed as an image once; a folder now
    cache = Thumbnails(tmp_path / "cache", PIXELS)
    for make in (lambda: make_thumbnail(folder, PIXELS), lambda: cache.get(folder)):
        with pytest.raises(ThumbnailError) as caught:
            make()
        assert str(caught.value) == f"cannot read the image: {os.strerror(errno.EISDIR)}"
    gone = odd_name(tmp_path, b"gone\xff")  # removed since the page listed it: was a bare OSError
    with pytest.raises(ThumbnailError) as caught:
        cache.get(gone)
    assert str(caught.value) == f"cannot read the image: {os.strerror(errno.ENOENT)}"


def test_an_image_replaced_by_one_of_the_same_size_and_mtime_gets_its_own_thumbnail(tmp_path: Path) -> None:
    """Uncompressed images of one size (BMP) have one byte count, and an archive that keeps times
    gives the new one the old one's mtime: keyed on size and mtime only, the old picture showed."""
    image = tmp_path / "data" / "img.bmp"
    image.parent.mkdir()
    image.write_bytes(image_bytes(3, "BMP", (300, 200)))
    cache = Thumbnails(tmp_path / "thumbs", PIXELS, 10**9)
    old = cache.get(image)
    mtime = image.stat().st_mtime_ns
    new = image.with_name("new.bmp")
    new.write_bytes(image_bytes(4, "BMP", (300, 200)))
    assert new.stat().st_size == image.stat().st_size
    os.utime(new, ns=(mtime, mtime))
    os.replace(new, image)
    assert cache.get(image) == make_thumbnail(image, PIXELS) != old
