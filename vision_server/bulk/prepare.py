"""Image bytes → pixels at the model's size, in worker processes so the GIL never starves the
model thread. Everything here is a top-level function over picklable values.

The worker reads the file itself (a path is cheaper to send than its bytes); images from tables
and tar shards arrive as bytes. A full-size decode lives only inside :func:`prepare_record`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vision_server.bulk.readers import describe_os_error
from vision_server.bulk.records import Record
from vision_server.errors import VisionServerError
from vision_server.images import PixelSpec, open_image


@dataclass(frozen=True)
class Prepared:
    """Model-size RGB pixels of one image (uint8, H x W x 3) and the image's own size."""

    pixels: np.ndarray = field(repr=False)
    original_size: tuple[int, int]


def worker_init() -> None:
    """Ctrl+C reaches the whole process group: the parent decides how to stop, not the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_record(record: Record, spec: PixelSpec, max_pixels: int) -> Prepared | str:
    """The record's image resized to ``spec``, or the reason it cannot be captioned."""
    try:
        data = record.data if record.data is not None else _read(record.path)
        image = open_image(data, max_pixels=max_pixels)
        resized = image.resize((spec.width, spec.height), resample=spec.resample)
        return Prepared(np.asarray(resized, dtype=np.uint8), image.size)
    except VisionServerError as exc:
        return exc.message
    except OSError as exc:
        return describe_os_error(exc)
    except Exception as exc:  # a decoder bug must not take the whole run down
        return f"cannot decode the image ({type(exc).__name__}: {exc})"


def _read(path: Path | None) -> bytes:
    if path is None:
        raise ValueError("record has neither a path nor bytes")
    return path.read_bytes()


def as_image(prepared: Prepared) -> Image.Image:
    """The prepared pixels as a PIL image (what today's :class:`CaptionItem` holds)."""
    return Image.fromarray(prepared.pixels, mode="RGB")
