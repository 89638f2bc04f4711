"""Test images: seeded noise (so different seeds give different captions) and flat colours.

Every layer builds its pictures here, so "an image" means the same thing in every test.
"""

from __future__ import annotations

import base64
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow's format name for each suffix the clients look for.
FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "webp": "WEBP",
}


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Random RGB pixels of ``size`` (width, height); the same seed gives the same picture."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def flat(size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    """One colour all over: the cheapest valid picture."""
    return Image.new("RGB", size, colour)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """The file bytes of ``image`` in ``fmt`` (WebP lossless, so a round trip keeps the pixels)."""
    buffer = io.BytesIO()
    if fmt.upper() == "WEBP":
        params.setdefault("lossless", True)
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    """The file bytes of ``noise(seed, size)``."""
    return encode(noise(seed, size), fmt)


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> str:
    """``image_bytes`` as plain base64, the native API's image field."""
    return to_b64(image_bytes(seed, fmt, size))


def data_url(seed: int, fmt: str = "PNG") -> str:
    """``image_bytes`` as a ``data:`` URL, as the OpenAI and Extras clients send it."""
    return f"data:image/{fmt.lower()};base64,{b64(seed, fmt)}"


def save(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """``noise(seed)`` written to ``path`` in the format its suffix names (any case); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(seed, size).save(path, format=FORMATS[path.suffix.lstrip(".").lower()])
    return path


def save_flat(
    path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16)
) -> Path:
    """``flat(size, colour)`` written to ``path`` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat(size, colour).save(path, format=FORMATS[path.suffix.lstrip(".").lower()])
    return path


def shade_b64(shade: int) -> str:
    """A flat 16x16 PNG as base64 whose colour follows ``shade`` (0-255): one distinct image per shade."""
    return to_b64(encode(flat((16, 16), (shade, 255 - shade, 7))))


def dds_with_zeroed_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are 0: Pillow's DDS plugin raises NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<8I", 32, 0, 0, 0, 0, 0, 0, 0)
    return b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + b"\0" * 64
