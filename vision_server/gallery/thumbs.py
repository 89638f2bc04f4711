"""Thumbnails made on the server and kept on disk, so a page of a big dataset loads fast.

A thumbnail is named by a hash of the image's resolved path, size and mtime: an edited image
gets a new one, and nothing a client sends becomes part of a file name. Written atomically
(temporary file, then rename), so a crash never leaves a torn JPEG that later reads would trust.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

EDGE = 256  # longest side, in pixels
QUALITY = 82
VERSION = 1  # bump when the way thumbnails are made changes


class ThumbnailError(ValueError):
    """The file is not an image Pillow can read, or it is too large to decode."""


class Thumbnails:
    def __init__(self, folder: Path, max_pixels: int) -> None:
        self.folder = folder
        self.max_pixels = max_pixels

    def get(self, image: Path) -> bytes:
        """The JPEG thumbnail of ``image``, made now unless a current one is cached."""
        real = image.resolve()
        info = real.stat()
        name = hashlib.sha256(f"{VERSION}\0{real}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()
        cached = self.folder / name[:2] / f"{name}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        data = make_thumbnail(real, self.max_pixels)
        self._store(cached, data)
        return data

    def _store(self, target: Path, data: bytes) -> None:
        """Best effort: a cache folder we cannot write only costs speed."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{secrets.token_hex(8)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError:
            pass


def make_thumbnail(path: Path, max_pixels: int) -> bytes:
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ThumbnailError(f"{width}x{height} pixels is over --max-image-pixels ({max_pixels})")
            image.draft("RGB", (EDGE, EDGE))  # JPEG: decode at a fraction of the size
            picture = ImageOps.exif_transpose(image) or image
            picture = picture.convert("RGB")
            picture.thumbnail((EDGE, EDGE))
            out = io.BytesIO()
            picture.save(out, "JPEG", quality=QUALITY)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        if isinstance(exc, ThumbnailError):
            raise
        raise ThumbnailError(f"cannot read the image: {exc}") from None
