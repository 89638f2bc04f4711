"""Thumbnails made on the server and kept on disk, so a page of a big dataset loads fast.

A thumbnail is named by a hash of the image's resolved path, size and mtime: an edited image
gets a new one, and nothing a client sends becomes part of a file name. Written atomically
(temporary file, then rename), so a crash never leaves a torn JPEG that later reads would trust.

The cache has a size cap (``--thumbnail-cache-size``). Edited images leave their old thumbnails
behind and a big dataset has many, so once the bytes written pass the cap the least recently
used thumbnails go until the cache is back under :data:`LOW_WATER` of it. "Used" is the file's
mtime, set again whenever a thumbnail is served from the cache: access times cannot be trusted,
since many disks are mounted ``noatime``. The check runs in the thread that made a thumbnail
(never on the event loop), and only when a running byte total passes the cap, not per request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vision_server.atomic_files import replacing
from vision_server.byte_sizes import format_byte_size
from vision_server.captionfiles import STALE_TEMP_AGE, describe_os_error, printable
from vision_server.errors import InvalidImage
from vision_server.images import ACCEPTED, ALLOWED_FORMATS, check_jpeg_scans, tiff_tile_pixels

EDGE = 256  # longest side, in pixels
QUALITY = 82
VERSION = 1  # bump when the way thumbnails are made changes
DEFAULT_CACHE_BYTES = 1024**3
LOW_WATER = 0.9  # a prune goes down to this share of the cap, so the next one is far off
_THUMB = re.compile(r"[0-9a-f]{64}\.jpg")  # what get() names a thumbnail
_TEMP = re.compile(r"\.[0-9a-f]{16}\.tmp")  # what _store() names its temporary file
_SHARD = re.compile(r"[0-9a-f]{2}")

log = logging.getLogger(__name__)


class ThumbnailError(ValueError):
    """The file is not an image Pillow can read, or it is too large to decode."""


@dataclass(frozen=True)
class Pruned:
    """What one pass over the cache did."""

    removed: int  # thumbnails deleted (least recently used first)
    temps: int  # temporary files a crash left, deleted
    kept_bytes: int  # what the cache holds now


class Thumbnails:
    """The thumbnail cache under ``folder``, at most ``max_bytes`` big (0: no disk cache at all).

    Thread-safe: the gallery makes thumbnails in worker threads, several at a time.
    """

    def __init__(self, folder: Path, max_pixels: int, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.folder = folder
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._total: int | None = None  # bytes in the cache as last counted, plus writes since
        self._count_lock = threading.Lock()
        self._prune_lock = threading.Lock()

    def get(self, image: Path) -> bytes:
        """The JPEG thumbnail of ``image``, made now unless a current one is cached."""
        try:
            real = image.resolve()
            info = real.stat()
        except OSError as exc:  # gone or unreadable since it was listed
            raise ThumbnailError(f"cannot read the image: {describe_os_error(exc)}") from None
        if self._total is None:  # the first use: count what an earlier run left, prune if needed
            self.prune_if_over()
        if self.max_bytes == 0:
            return make_thumbnail(real, self.max_pixels)
        # surrogatepass: a name that is not UTF-8 holds lone surrogates (a plain encode() was a 500).
        # The inode tells apart a new image of the same size and mtime (see gallery/stamps.py); the
        # device is left out, as a reboot may number it anew and these files outlive the server.
        stamp = f"{info.st_ino}\0{info.st_size}\0{info.st_mtime_ns}"
        key = f"{VERSION}\0{real}\0{stamp}".encode("utf-8", "surrogatepass")
        name = hashlib.sha256(key).hexdigest()
        cached = self.folder / name[:2] / f"{name}.jpg"
        try:
            data = cached.read_bytes()
        except OSError:
            pass
        else:
            _touch(cached)
            return data
        data = make_thumbnail(real, self.max_pixels)
        if self._store(cached, data):
            with self._count_lock:
                self._total = (self._total or 0) + len(data)
                over = self._total > self.max_bytes
            if over:
                self.prune_if_over()
        return data

    def _store(self, target: Path, data: bytes) -> bool:
        """Best effort: a cache folder we cannot write only costs speed."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with replacing(target, target.with_name(f".{secrets.token_hex(8)}.tmp"), durable=False) as tmp:
                tmp.write_bytes(data)
        except OSError:
            return False
        return True

    def prune_if_over(self) -> Pruned | None:
        """:meth:`prune`, unless another thread is already at it (then None: one pass is enough)."""
        if not self._prune_lock.acquire(blocking=False):
            return None
        try:
            return self._prune()
        finally:
            self._prune_lock.release()

    def prune(self) -> Pruned:
        """Count the cache; drop crash leftovers, and the least recently used thumbnails while it
        is over the cap (down to :data:`LOW_WATER` of it)."""
        with self._prune_lock:
            return self._prune()

    def _prune(self) -> Pruned:
        thumbs, temps = self._scan(time.time())
        total = sum(size for _, size, _ in thumbs)
        removed = 0
        if total > self.max_bytes:
            goal = int(self.max_bytes * LOW_WATER)
            for _, size, path in sorted(thumbs, key=lambda thumb: thumb[0]):
                if total <= goal:
                    break
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass  # another server on the same cache was faster
                except OSError:
                    continue
                total -= size
                removed += 1
        with self._count_lock:
            self._total = total
        if removed or temps:
            log.info(
                "thumbnail cache: removed %d least recently used thumbnail(s) and %d leftover "
                "temporary file(s); %s kept (cap %s)",
                removed,
                temps,
                format_byte_size(total),
                format_byte_size(self.max_bytes),
            )
        return Pruned(removed, temps, total)

    def _scan(self, now: float) -> tuple[list[tuple[float, int, Path]], int]:
        """Every thumbnail as (mtime, size, path); old temporary files are deleted on the way.

        Only names the cache itself makes are looked at, so a cache dir shared with other files
        (converted models live beside it) never loses anything else.
        """
        thumbs: list[tuple[float, int, Path]] = []
        temps = 0
        try:
            shards = [entry for entry in os.scandir(self.folder) if _SHARD.fullmatch(entry.name)]
        except OSError:
            return thumbs, temps
        for shard in shards:
            try:
                with os.scandir(shard.path) as entries:
                    files = list(entries)
            except OSError:
                continue
            for entry in files:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                    if _THUMB.fullmatch(entry.name):
                        thumbs.append((info.st_mtime, info.st_size, Path(entry.path)))
                    elif _TEMP.fullmatch(entry.name) and now - info.st_mtime >= STALE_TEMP_AGE:
                        os.unlink(entry.path)  # a write takes milliseconds: this one was cut off
                        temps += 1
                except OSError:
                    continue
        return thumbs, temps


def _touch(path: Path) -> None:
    """Mark a thumbnail as used now (its mtime: the prune's notion of recent use)."""
    with contextlib.suppress(OSError):  # a read-only cache, or pruned by another server this instant
        os.utime(path)


def make_thumbnail(path: Path, max_pixels: int) -> bytes:
    """A JPEG of at most :data:`EDGE` pixels a side. Only the formats a caption request may send
    are opened: a dataset is often downloaded, and a file named ``.png`` that holds EPS would
    otherwise reach Ghostscript (or PSD, DDS and the rest their parsers) when its thumbnail is made."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ThumbnailError(f"{width}x{height} pixels is over --max-image-pixels ({max_pixels})")
            # the traps a caption request is refused for: a tile larger than the image, thousands
            # of JPEG scans (minutes of decoding for one thumbnail, with two made at a time)
            if tiff_tile_pixels(image) > max_pixels:
                raise ThumbnailError(
                    f"its tiles of {tiff_tile_pixels(image)} pixels are over --max-image-pixels"
                )
            if image.format in ("JPEG", "MPO"):
                check_jpeg_scans(path.read_bytes())
            image.draft("RGB", (EDGE, EDGE))  # JPEG: decode at a fraction of the size
            picture = ImageOps.exif_transpose(image) or image
            picture = picture.convert("RGB")
            picture.thumbnail((EDGE, EDGE))
            out = io.BytesIO()
            picture.save(out, "JPEG", quality=QUALITY)
            return out.getvalue()
    except UnidentifiedImageError:
        raise ThumbnailError(f"the file is not in a supported image format ({ACCEPTED})") from None
    except InvalidImage as exc:
        raise ThumbnailError(exc.reason) from None
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        if isinstance(exc, ThumbnailError):
            raise
        raise ThumbnailError(f"cannot read the image: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    """Why an image could not be read, in words and on one line. The route names the image
    (relative to the gallery, :func:`~vision_server.captionfiles.printable`); an OS error's own
    text would name it again as Python's repr of the absolute path (``[Errno 21] Is a
    directory: '/data/caf\\udce9.png'``), so only its reason is kept."""
    if isinstance(exc, OSError) and exc.strerror:
        return describe_os_error(exc)
    return printable(str(exc))
