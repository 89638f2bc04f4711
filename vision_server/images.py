"""Turn what clients send (base64, data URLs, raw bytes) into model-ready pixels, within limits.

A request's image is decoded, oriented, flattened to RGB and resized to the model's input size in
one call (:func:`prepare_image`), on one bounded thread pool before the queue. A queued job then
holds only its small uint8 pixels and the original size: a full-size decode never outlives that
call, so memory per queued job is bounded by the model's input size, not by what a client sent;
and the full-size decodes in flight together hold at most ``max_pixels`` pixels
(:class:`DecodeBudget`), however many threads the pool has.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_server.errors import Draining, InvalidImage, PayloadTooLarge

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)
T = TypeVar("T")
BASE64_SLICE = 1 << 18  # characters decoded per C call (about 0.3 ms each)
_WHITESPACE = b" \t\n\r\v\f"
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Only these Pillow plugins ever see client bytes: other formats (EPS shells out to Ghostscript,
# DDS, PSD, ...) are refused before any of their code runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves at least this
# many pixels per side: Florence-2 looks at 768x768, so nothing it could see is lost, and
# decoding a 2048x1536 photo costs about a third less.
JPEG_DRAFT_SIZE = 768
# A progressive JPEG is decoded scan by scan, each scan one more pass over every 8x8 block of the
# image, and nothing in the format bounds their number: a 1 MB file of 100,000 near-empty scans
# over an 8000x8000 image kept a decode thread (and, at 64 MP, the whole decode budget) busy for
# minutes. Encoders write about 10 (libjpeg's progressive script) to a few dozen; 500 scans of
# the largest allowed image (8000x8000) decode in about 3 s on one core.
MAX_JPEG_SCANS = 500
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323  # TIFF tag numbers


@dataclass(frozen=True)
class ImageSource:
    """Where the bytes came from, so a refusal speaks about what the reader handed over: a
    client that sent base64 is told what to send, one that uploaded a file about its upload,
    and someone captioning their own folder about their file (they send nothing)."""

    empty: str
    unsupported: str
    # what to do about an image over the pixel limit: whoever reads the file may raise it
    too_big: str = "Downscale it before sending."


SENT = ImageSource("the image is empty", f"not a supported image format; send {ACCEPTED}")
UPLOADED = ImageSource(
    "the uploaded file is empty (0 bytes)",
    f"the uploaded file is not a supported image format; send {ACCEPTED}",
)
LOCAL_FILE = ImageSource(
    "the file is empty (0 bytes)",
    f"the file is not in a supported image format ({ACCEPTED})",
    "Downscale it, or raise --max-image-pixels.",
)
STORED = ImageSource(  # bytes read from a table or an archive, not from a file of their own
    "the stored image is empty (0 bytes)",
    f"the stored image is not in a supported image format ({ACCEPTED})",
    "Downscale it, or raise --max-image-pixels.",
)
EXIF_ORIENTATION = 0x0112
# Pillow allocates an image in blocks of this size (16 MB by default). glibc serves requests up
# to its mmap threshold (which rises to 32 MB after the first big free) from the arena of the
# thread that asked, and keeps what is freed there: four decode threads then each kept a
# 256 MB heap after a burst of 8000x8000 PNGs. Blocks above 32 MB are always mmap()ed, so a
# full-size decode's memory goes back to the OS the moment it is freed, whichever thread held it.
PILLOW_BLOCK_SIZE = 64 * 1024 * 1024
Image.core.set_block_size(PILLOW_BLOCK_SIZE)


def decode_base64(text: str) -> bytes:
    """Decode plain base64 or a ``data:image/...;base64,`` URL (whitespace tolerated).

    Decoded a slice at a time: each C call holds the GIL for well under a millisecond, so a 12 MB
    upload decoding on the pool never stalls the event loop for long (a regex over the whole
    body held it for ~70 ms, a single ``b64decode`` for ~50 ms).
    """
    match = _DATA_URL.match(text)
    if text.startswith("data:") and not match:
        raise InvalidImage("a data URL must be base64-encoded ('data:image/png;base64,...')")
    start = match.end() if match else 0
    table = _URLSAFE if ("-" in text or "_" in text) else None
    decoded = bytearray()
    carry = b""
    for offset in range(start, len(text), BASE64_SLICE):
        try:
            piece = text[offset : offset + BASE64_SLICE].encode("ascii")
        except UnicodeEncodeError:
            raise InvalidImage("not valid base64 (it contains a non-ASCII character)") from None
        piece = carry + piece.translate(table, _WHITESPACE)
        whole = len(piece) - len(piece) % 4  # quartets stay aligned: a padded one is never split
        decoded += _b64decode(piece[:whole])
        carry = piece[whole:]
    carry = carry.rstrip(b"=")  # missing or surplus padding is forgiven, as clients get it wrong
    if carry:
        decoded += _b64decode(carry + b"=" * (-len(carry) % 4))
    if not decoded and not carry:
        raise InvalidImage("the image string is empty")
    return bytes(decoded)


def _b64decode(data: bytes) -> bytes:
    try:
        return _strict_a2b_base64(data)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"not valid base64 ({exc})") from None


if sys.version_info >= (3, 11):

    def _strict_a2b_base64(data: bytes) -> bytes:
        return binascii.a2b_base64(data, strict_mode=True)

else:  # pragma: no cover - Python 3.10: no strict_mode, which would otherwise skip what it refuses

    def _strict_a2b_base64(data: bytes) -> bytes:
        """What ``strict_mode`` refuses, refused first: a byte outside the alphabet, padding
        anywhere but at the end, or the wrong amount of it after an unfinished quartet."""
        body = data.rstrip(b"=")
        if body.translate(None, _ALPHABET):
            raise binascii.Error("Only base64 data is allowed")
        padding, missing = len(data) - len(body), -len(body) % 4
        if padding and (not body or missing == 3 or (missing and padding != missing)):
            raise binascii.Error("Misplaced or excess padding")
        return binascii.a2b_base64(data)


def open_image(data: bytes, *, max_pixels: int, source: ImageSource = SENT) -> Image.Image:
    """Bytes → RGB image with EXIF orientation applied; size is checked before pixels are decoded."""
    return _load_rgb(_open_header(data, max_pixels, source), max_pixels, source)


def _open_header(data: bytes, max_pixels: int, source: ImageSource) -> Image.Image:
    """The image with only its header read (allowed formats only), its size checked."""
    if not data:
        raise InvalidImage(source.empty)
    with _as_client_errors(max_pixels, source):
        image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        _check_pixels(image, max_pixels, source)
        if image.format == "TIFF":
            _check_tiles(image, max_pixels)
        if image.format in ("JPEG", "MPO"):
            check_jpeg_scans(data)
        if image.format == "JPEG" and min(image.size) >= 2 * JPEG_DRAFT_SIZE:
            image.draft("RGB", (JPEG_DRAFT_SIZE, JPEG_DRAFT_SIZE))
        return image


def _load_rgb(image: Image.Image, max_pixels: int, source: ImageSource) -> Image.Image:
    """Decode the pixels, apply EXIF orientation, flatten to RGB."""
    with _as_client_errors(max_pixels, source):
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transposing copies: only when needed
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)


@contextmanager
def _decoded(
    data: bytes, *, max_pixels: int, budget: DecodeBudget | None = None, source: ImageSource = SENT
) -> Iterator[Image.Image]:
    """The RGB image, decoded once ``budget`` has room for its pixels; closed (its memory freed)
    and its pixels handed back to the budget when the block ends."""
    image = _open_header(data, max_pixels, source)
    try:
        with budget.hold(pixels_to_decode(image)) if budget else _nothing():
            rgb = _load_rgb(image, max_pixels, source)
            try:
                yield rgb
            finally:
                rgb.close()
    finally:
        image.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _as_client_errors(max_pixels: int, source: ImageSource) -> Iterator[None]:
    """Pillow's exceptions for bad or hostile bytes → 400 / 413 with a message that says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as exc:  # Pillow's own guard, in open(), for absurd sizes
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{claimed.group(1)} pixels" if claimed else "too many pixels"
        raise PayloadTooLarge(f"Image has {size}; the limit is {max_pixels}. {source.too_big}") from None
    except UnidentifiedImageError:
        raise InvalidImage(source.unsupported) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot decode the image ({exc})") from None


class DecodeBudget:
    """Caps the pixels of the full-size decodes in flight, whatever their number.

    Threads bound how many images decode at once, not how big they are: four 8000x8000 PNGs
    are 1 GB of Pillow buffers (4 bytes a pixel) at once. An image waits here after its header
    is read and before its pixels are, until they fit; one image always fits when nothing else
    is decoding, so no image waits forever. JPEGs count at their reduced (draft) size.
    """

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Pixels being decoded now."""
        return self._used

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            while self._used and self._used + pixels > self.pixels:
                self._changed.wait()
            self._used += pixels
        try:
            yield
        finally:
            with self._changed:
                self._used -= pixels
                self._changed.notify_all()


def _check_pixels(image: Image.Image, max_pixels: int, source: ImageSource) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}. "
            f"{source.too_big}"
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")


def tiff_tile_pixels(image: Image.Image) -> int:
    """Pixels in one tile of a tiled TIFF (0 for any other image).

    A TIFF is decoded a tile at a time, into a buffer of the tile's size whatever the image's:
    a 64x64 image declaring one 4096x262144 tile (1 MB of deflate) took 1 GB and 8 s to decode,
    past a pixel check that saw 4096 pixels."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return 0
    try:
        return int(tags.get(TIFF_TILE_WIDTH) or 0) * int(tags.get(TIFF_TILE_LENGTH) or 0)
    except (TypeError, ValueError):
        raise InvalidImage("the TIFF's tile size is not a number") from None


def pixels_to_decode(image: Image.Image) -> int:
    """What decoding ``image`` holds at once, in pixels: the image, or a larger TIFF tile."""
    return max(image.width * image.height, tiff_tile_pixels(image))


def _check_tiles(image: Image.Image, max_pixels: int) -> None:
    tile = tiff_tile_pixels(image)
    if tile > max_pixels:
        raise PayloadTooLarge(
            f"Image is stored in tiles of {tile} pixels each (its size is {image.width}x"
            f"{image.height}); the limit is {max_pixels}. Re-save it untiled, or with tiles of a "
            "usual size such as 256x256."
        )


def check_jpeg_scans(data: bytes) -> None:
    """400 for a JPEG of more than :data:`MAX_JPEG_SCANS` scans, before any is decoded.

    Counting ``FF DA`` (start of scan) is exact enough: in entropy-coded data every ``FF`` byte is
    followed by ``00`` or a restart marker, so only real scans (an EXIF thumbnail's included)
    and, rarely, metadata bytes match, and real images stay far below the limit."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(
            f"the JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS} (encoders write about 10, "
            "and each scan costs one more pass over the whole image). Re-save it as a baseline "
            "JPEG or a PNG."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode to 8-bit RGB: transparency onto white, 16-bit scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = _sixteen_bit_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit integer) greyscale to 8 bits by its real range."""
    as_int = image.convert("I")
    low, high = cast(tuple[float, float], as_int.getextrema())  # one band: (min, max)
    scale = 255.0 / (high - low) if high > low else 0.0
    return as_int.point(lambda value: (value - low) * scale).convert("L")


@dataclass(frozen=True)
class PixelSpec:
    """How a model wants its pixels: one resize to a fixed size, then rescale and normalise."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Image.Resampling = Image.Resampling.BICUBIC
    rescale: float = 1 / 255


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """What a queued job keeps of an image: its pixels at the model's size, and its original size.

    ``pixels`` is uint8, height x width x 3, C-contiguous: a 768x768 image is 1.7 MB however
    large the upload was. Normalising to floats waits until the batch is assembled.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]  # (width, height) as sent, after EXIF orientation

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``pixels``."""
        return (int(self.pixels.shape[1]), int(self.pixels.shape[0]))


def prepare_image(
    data: bytes,
    spec: PixelSpec,
    *,
    max_pixels: int,
    budget: DecodeBudget | None = None,
    source: ImageSource = SENT,
) -> PreparedImage:
    """Bytes → :class:`PreparedImage`: decode (allowed formats only), orient, flatten, resize.

    The full-size decode exists only inside this call, within ``budget`` when one is given;
    ``source`` words the refusals. A top-level function of picklable arguments, so it runs in a
    worker thread or process alike.
    """
    with _decoded(data, max_pixels=max_pixels, budget=budget, source=source) as image:
        return fit_image(image, spec)


def fit_image(image: Image.Image, spec: PixelSpec) -> PreparedImage:
    """An RGB image resized straight to the model's input size (one resize, as the model's
    own image processor does), kept as uint8."""
    resized = image.resize((spec.width, spec.height), resample=spec.resample)
    pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))
    pixels.flags.writeable = False
    return PreparedImage(pixels=pixels, original_size=image.size)


class ImageDecoder:
    """Decodes and resizes images on one small thread pool, with the server's limits.

    ``spec`` is asked on the pool thread for every image, so a model whose input size becomes
    known (or changes) later is honoured without restarting the pool; a call may pass its own
    (the spec of the model its request picked) instead of this default. Full-size decodes share a
    budget of ``max_pixels`` pixels: one image of the largest allowed size at a time, or many
    photos side by side.

    Bulk work (``bulk=True``: a folder run's uploads) decodes on a pool of its own, so one
    person's image is never queued behind dozens of a folder run's; both pools share the budget.
    """

    def __init__(self, *, max_pixels: int, spec: Callable[[], PixelSpec], threads: int = 4) -> None:
        self.max_pixels = max_pixels
        self.budget = DecodeBudget(max_pixels)
        self._spec = spec
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vision-decode")
        self._bulk_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vision-decode-bulk")
        self._closed = False

    async def from_base64(
        self, text: str, *, bulk: bool = False, spec: Callable[[], PixelSpec] | None = None
    ) -> PreparedImage:
        """Decode base64 or a data URL and fit it to ``spec`` (the decoder's own when None): with
        several models served, each request is fitted to the input size of the model it picked."""
        return await self._in_pool(self._prepare_text, text, spec or self._spec, bulk)

    async def from_bytes(
        self,
        data: bytes,
        *,
        bulk: bool = False,
        spec: Callable[[], PixelSpec] | None = None,
        source: ImageSource = UPLOADED,
    ) -> PreparedImage:
        """Decode an uploaded file's bytes (or, with ``source``, other bytes) and fit them to
        ``spec`` (as :meth:`from_base64`)."""
        prepare = partial(self._prepare_bytes, source=source)
        return await self._in_pool(prepare, data, spec or self._spec, bulk)

    async def _in_pool(
        self,
        func: Callable[[Any, Callable[[], PixelSpec]], PreparedImage],
        arg: Any,
        spec: Callable[[], PixelSpec],
        bulk: bool = False,
    ) -> PreparedImage:
        """Run ``func(arg, spec)`` on a pool; a job the closing pool drops is a 503, not a lost reply."""
        if self._closed:
            raise Draining("The server is shutting down; retry on another instance.", retry_after=5)
        future = (self._bulk_pool if bulk else self._pool).submit(func, arg, spec)
        # Not asyncio.wrap_future: a job the pool drops would then cancel this task's await, and
        # only Task.cancelling() (Python 3.11+) could tell that from the task being cancelled.
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[PreparedImage] = loop.create_future()
        future.add_done_callback(partial(_hand_over, loop, outcome))
        try:
            return await outcome
        except asyncio.CancelledError:
            future.cancel()  # nobody waits for this image any more: the pool may skip it
            raise

    def _prepare_text(self, text: str, spec: Callable[[], PixelSpec]) -> PreparedImage:
        return self._prepare_bytes(decode_base64(text), spec)

    def _prepare_bytes(
        self, data: bytes, spec: Callable[[], PixelSpec], source: ImageSource = SENT
    ) -> PreparedImage:
        return prepare_image(data, spec(), max_pixels=self.max_pixels, budget=self.budget, source=source)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._bulk_pool.shutdown(wait=False, cancel_futures=True)


def _hand_over(loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[T], done: Future[T]) -> None:
    """Pass a pool job's end to the request awaiting it, on its loop (from any thread)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(_settle, outcome, done)


def _settle(outcome: asyncio.Future[T], done: Future[T]) -> None:
    if outcome.cancelled():  # the request was cancelled first
        return
    if done.cancelled():  # only the closing pool cancels a job nobody cancelled
        outcome.set_exception(Draining("The server shut down before this image was read.", retry_after=5))
    elif (error := done.exception()) is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(done.result())
