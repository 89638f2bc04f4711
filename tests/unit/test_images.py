"""Image decoding: every mode clients send becomes RGB, and limits hold before decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import multiprocessing
import pickle
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from tests.support.images import dds_with_zeroed_pixel_format
from vision_server import images
from vision_server.errors import Draining, InvalidImage, PayloadTooLarge
from vision_server.images import (
    ALLOWED_FORMATS,
    LOCAL_FILE,
    SENT,
    STORED,
    UPLOADED,
    DecodeBudget,
    ImageDecoder,
    PixelSpec,
    PreparedImage,
    decode_base64,
    open_image,
    prepare_image,
)

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_plain_base64_and_data_url_decode_to_the_same_bytes() -> None:
    raw = encode(Image.new("RGB", (4, 4), "red"))
    text = base64.b64encode(raw).decode()
    assert decode_base64(text) == raw
    assert decode_base64("data:image/png;base64," + text) == raw
    assert decode_base64(text[:10] + "\n" + text[10:]) == raw  # wrapped base64 (base64 without -w0)
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw


@pytest.mark.parametrize(
    "bad",
    # the padding cases: at the start, in the middle, too much of it after an unfinished quartet
    ["", "!!!not base64!!!", "data:image/png,rawdata", "=AAA", "QUI=QUJD", "QQ==QQ==", "Q==="],
)
def test_invalid_base64_is_a_clear_error(bad: str) -> None:
    with pytest.raises(InvalidImage, match=r"^Invalid image data: "):
        decode_base64(bad)


def test_not_an_image_and_truncated_image_are_invalid() -> None:
    with pytest.raises(InvalidImage, match="not a supported image format"):
        open_image(b"hello world", max_pixels=LIMIT)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = encode(noisy)[:300]
    with pytest.raises(InvalidImage):
        open_image(truncated, max_pixels=LIMIT)


def test_too_many_pixels_is_413_before_decoding() -> None:
    big = encode(Image.new("1", (3000, 3000)))  # compresses to a few KB: a small bomb
    with pytest.raises(PayloadTooLarge, match="3000x3000"):
        open_image(big, max_pixels=1_000_000)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = open_image(encode(image, "JPEG", exif=exif), max_pixels=LIMIT)
    assert decoded.size == (20, 40)


def test_transparency_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    decoded = open_image(encode(rgba), max_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.info["transparency"] = 0
    assert open_image(encode(palette, transparency=0), max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)


def rgb(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    """One pixel of an RGB image: a tuple (Pillow types getpixel for every mode)."""
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple), pixel
    return pixel


def test_sixteen_bit_greyscale_keeps_its_contrast() -> None:
    ramp = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (4, 1))
    decoded = open_image(encode(Image.fromarray(ramp)), max_pixels=LIMIT)
    values = [rgb(decoded, (x, 0))[0] for x in (0, 15)]
    assert decoded.mode == "RGB" and values[0] < 10 and values[1] > 245


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = open_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), max_pixels=LIMIT)
    red, green, blue = rgb(decoded, (4, 4))
    assert decoded.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = open_image(buffer.getvalue(), max_pixels=LIMIT)
    red, _, blue = rgb(decoded, (4, 4))
    assert red > 200 and blue < 60


def test_large_jpeg_decodes_at_reduced_scale() -> None:
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (4000, 3200, 3), dtype=np.uint8))
    decoded = open_image(encode(big, "JPEG", quality=70), max_pixels=64_000_000)
    assert min(decoded.size) >= 768 and max(decoded.size) < 4000


# --- only the documented formats are decoded ---------------------------------------------------

SPEC = PixelSpec(height=768, width=768, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MINIMAL_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n0 0 moveto\nshowpage\n%%EOF\n"


def test_eps_never_reaches_the_postscript_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    reached: list[str] = []

    def spy(self: object) -> None:
        reached.append("EPS")
        raise AssertionError("the PostScript plugin ran on client bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    with pytest.raises(InvalidImage) as info:
        prepare_image(MINIMAL_EPS, SPEC, max_pixels=LIMIT)
    assert reached == []
    assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in str(info.value)


@pytest.mark.parametrize("payload", [dds_with_zeroed_pixel_format(), MINIMAL_EPS], ids=["dds", "eps"])
def test_other_pillow_formats_are_a_clear_client_error(payload: bytes) -> None:
    with pytest.raises(InvalidImage, match="not a supported image format; send PNG, JPEG"):
        open_image(payload, max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("source", "empty", "unsupported"),
    [
        (SENT, "the image is empty", "not a supported image format; send PNG, JPEG"),
        (
            UPLOADED,
            "the uploaded file is empty (0 bytes)",
            "the uploaded file is not a supported image format; send PNG",
        ),
        (LOCAL_FILE, "the file is empty (0 bytes)", "the file is not in a supported image format (PNG, JPEG"),
        (
            STORED,
            "the stored image is empty (0 bytes)",
            "the stored image is not in a supported image format (PNG",
        ),
    ],
)
def test_refusals_speak_about_what_the_reader_handed_over(
    source: images.ImageSource, empty: str, unsupported: str
) -> None:
    """A client that sent base64 is told what to send; an upload, a local file and a table's bytes
    are named as what they are (offline, nobody sends anything)."""
    for data, words in ((b"", empty), (b"plain text, no image", unsupported)):
        with pytest.raises(InvalidImage) as info:
            prepare_image(data, SPEC, max_pixels=LIMIT, source=source)
        assert info.value.message.startswith("Invalid image data: ") and words in info.value.message
    if source in (LOCAL_FILE, STORED):
        with pytest.raises(InvalidImage) as info:
            open_image(b"plain text", max_pixels=LIMIT, source=source)
        assert "send" not in info.value.message


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_documented_format_decodes(fmt: str) -> None:
    prepared = prepare_image(encode(Image.new("RGB", (30, 20), "red"), fmt), SPEC, max_pixels=LIMIT)
    assert prepared.original_size == (30, 20) and prepared.pixels.shape == (768, 768, 3)


# --- what a queued job keeps -----------------------------------------------------------------


def test_prepared_image_holds_only_model_sized_uint8_pixels() -> None:
    huge = encode(Image.new("RGB", (4000, 4000), (10, 120, 200)))  # ~50 KB on the wire, 48 MB decoded
    prepared = prepare_image(huge, SPEC, max_pixels=64_000_000)
    assert prepared.original_size == (4000, 4000) and prepared.size == (768, 768)
    pixels = prepared.pixels
    assert pixels.dtype == np.uint8 and pixels.shape == (768, 768, 3) and pixels.flags.c_contiguous
    assert (
        pixels.base is None or memoryview(pixels.base).nbytes == pixels.nbytes  # type: ignore[arg-type]  # numpy's stubs give ndarray a __buffer__ only from Python 3.12
    )  # not a view of a full decode
    assert tuple(pixels[0, 0]) == (10, 120, 200)


def test_exif_orientation_is_applied_before_the_resize() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = prepare_image(
        encode(Image.new("RGB", (40, 20), "blue"), "JPEG", exif=exif), SPEC, max_pixels=LIMIT
    )
    assert prepared.original_size == (20, 40)


def test_prepare_image_runs_in_a_worker_process() -> None:
    """Bulk captioning prepares images in a process pool: the function and its result must pickle."""
    data = encode(Image.new("RGB", (50, 40), (1, 2, 3)))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        prepared = pool.submit(prepare_image, data, SPEC, max_pixels=LIMIT).result(timeout=120)
    assert prepared.original_size == (50, 40) and tuple(prepared.pixels[5, 5]) == (1, 2, 3)
    assert np.array_equal(pickle.loads(pickle.dumps(prepared)).pixels, prepared.pixels)


# --- big uploads are decoded a slice at a time ---------------------------------------------------


def test_big_base64_is_decoded_in_slices_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """No single C call sees the whole 12 MB body: each would hold the GIL and stall the event loop."""
    import binascii

    from vision_server import images

    raw = np.random.default_rng(3).integers(0, 255, 9_000_001, dtype=np.uint8).tobytes()
    wrapped = base64.encodebytes(raw).decode()  # 76-column lines, as `base64` without -w0 writes
    seen: list[int] = []
    real = binascii.a2b_base64

    def spy(data: bytes, **kwargs: object) -> bytes:
        seen.append(len(data))
        # 3.11+ types a2b_base64's strict_mode: bool, which object is not; 3.10 has no keywords to check
        return real(data, **kwargs)  # type: ignore[arg-type, unused-ignore]

    monkeypatch.setattr(images.binascii, "a2b_base64", spy)
    assert decode_base64("data:image/png;base64," + wrapped) == raw
    assert len(seen) > 10 and max(seen) <= images.BASE64_SLICE


# --- full-size decodes share a pixel budget ----------------------------------------------------


def test_budget_makes_a_decode_wait_until_its_pixels_fit() -> None:
    budget = DecodeBudget(100)
    holding, release, entered = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with budget.hold(80):
            holding.set()
            release.wait(10)

    def second() -> None:
        with budget.hold(50):
            entered.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    assert not entered.wait(0.3), "80 + 50 pixels decoded at once under a budget of 100"
    release.set()
    assert entered.wait(10)
    for thread in threads:
        thread.join(10)
    assert budget.in_use == 0


def test_an_image_larger_than_the_budget_still_decodes_alone() -> None:
    budget = DecodeBudget(10)
    prepared = prepare_image(encode(Image.new("RGB", (30, 20), "red")), SPEC, max_pixels=LIMIT, budget=budget)
    assert prepared.original_size == (30, 20) and budget.in_use == 0


class RecordingBudget(DecodeBudget):
    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.held: list[int] = []

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        self.held.append(pixels)
        with super().hold(pixels):
            yield


def test_the_budget_counts_the_pixels_actually_decoded_and_is_returned_on_errors() -> None:
    budget = RecordingBudget(LIMIT)
    prepare_image(encode(Image.new("RGB", (300, 200), "red")), SPEC, max_pixels=LIMIT, budget=budget)
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (2000, 3000, 3), dtype=np.uint8))
    prepare_image(encode(photo, "JPEG"), SPEC, max_pixels=LIMIT, budget=budget)
    truncated = encode(Image.new("RGB", (400, 400), "blue"))[:-200]
    with pytest.raises(InvalidImage):
        prepare_image(truncated, SPEC, max_pixels=LIMIT, budget=budget)
    assert budget.held == [300 * 200, 1500 * 1000, 400 * 400]  # the JPEG at its 1/2 draft scale
    assert budget.in_use == 0


async def test_the_decoder_holds_the_full_size_only_inside_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoder = ImageDecoder(max_pixels=LIMIT, spec=lambda: SPEC, threads=2)
    seen: list[tuple[int, bool]] = []
    real_fit = images.fit_image

    def spy(image: Image.Image, spec: PixelSpec) -> PreparedImage:
        seen.append((decoder.budget.in_use, threading.current_thread().name.startswith("vision-decode")))
        return real_fit(image, spec)

    monkeypatch.setattr(images, "fit_image", spy)
    try:
        prepared = await decoder.from_bytes(encode(Image.new("RGB", (640, 480), "green")))
    finally:
        decoder.close()
    assert seen == [(640 * 480, True)] and decoder.budget.in_use == 0
    assert prepared.size == (768, 768)


async def test_an_interactive_image_is_not_decoded_behind_a_folder_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoder = ImageDecoder(max_pixels=LIMIT, spec=lambda: SPEC, threads=1)
    gate = threading.Event()
    real_fit = images.fit_image

    def held_for_bulk(image: Image.Image, spec: PixelSpec) -> PreparedImage:
        if threading.current_thread().name.startswith("vision-decode-bulk"):
            assert gate.wait(30), "the test never let the bulk decodes go"
        return real_fit(image, spec)

    monkeypatch.setattr(images, "fit_image", held_for_bulk)
    data = encode(Image.new("RGB", (64, 48), "green"))
    try:
        bulk = [asyncio.ensure_future(decoder.from_bytes(data, bulk=True)) for _ in range(3)]
        urgent = await asyncio.wait_for(decoder.from_bytes(data), 10)  # the bulk pool is stuck
        assert urgent.original_size == (64, 48) and not any(task.done() for task in bulk)
        gate.set()
        assert all(p.original_size == (64, 48) for p in await asyncio.gather(*bulk))
    finally:
        gate.set()
        decoder.close()


async def test_a_closing_pool_answers_503_but_a_cancelled_wait_stays_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool drops its queued jobs at shutdown: their requests get 503, except one whose task
    was cancelled first (the client left), which must end cancelled, not with an answer."""
    started, gate = threading.Event(), threading.Event()
    real_fit = images.fit_image

    def held(image: Image.Image, spec: PixelSpec) -> PreparedImage:
        started.set()
        assert gate.wait(30), "the test never let the first decode go"
        return real_fit(image, spec)

    monkeypatch.setattr(images, "fit_image", held)
    decoder = ImageDecoder(max_pixels=LIMIT, spec=lambda: SPEC, threads=1)
    data = encode(Image.new("RGB", (64, 48), "green"))
    try:
        running = asyncio.ensure_future(decoder.from_bytes(data))
        assert await asyncio.to_thread(started.wait, 30)
        dropped, left = (asyncio.ensure_future(decoder.from_bytes(data)) for _ in range(2))
        await asyncio.sleep(0)  # both are queued on the pool
        left.cancel()
        decoder.close()  # in the same loop step as the cancel: both end their waits at once
    finally:
        gate.set()
    assert (await running).original_size == (64, 48)
    with pytest.raises(Draining, match="shut down before this image was read"):
        await dropped
    with pytest.raises(asyncio.CancelledError):
        await left


async def test_each_call_may_fit_its_image_to_its_own_models_size() -> None:
    """Several models served: an image is fitted to the model its request picked, on the pool
    (the spec is asked there), and a call without one gets the decoder's default."""
    small = PixelSpec(height=32, width=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    asked_on: list[str] = []

    def small_spec() -> PixelSpec:
        asked_on.append(threading.current_thread().name)
        return small

    decoder = ImageDecoder(max_pixels=LIMIT, spec=lambda: SPEC, threads=1)
    data = encode(Image.new("RGB", (64, 48), "green"))
    try:
        fitted = await decoder.from_bytes(data, spec=small_spec)
        from_text = await decoder.from_base64(base64.b64encode(data).decode(), spec=small_spec)
        default = await decoder.from_bytes(data, bulk=True)
    finally:
        decoder.close()
    assert fitted.size == from_text.size == (48, 32) and default.size == (SPEC.width, SPEC.height)
    assert len(asked_on) == 2 and all(name.startswith("vision-decode") for name in asked_on)


def test_full_size_decodes_use_blocks_glibc_always_maps() -> None:
    """Above glibc's largest mmap threshold (32 MiB), freed blocks go back to the OS at once."""
    assert Image.core.get_block_size() == images.PILLOW_BLOCK_SIZE > 32 * 1024 * 1024


def test_an_image_over_the_pixel_limit_is_told_what_to_do_by_who_reads_it() -> None:
    """A client can only downscale what it sends; someone captioning their own files
    (``vision-server caption``, the gallery) can also raise the limit. "Downscale it before
    sending" told them of a sending they never did, and not of ``--max-image-pixels``."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buffer, format="PNG")
    for source, advice in (
        (SENT, "Downscale it before sending."),
        (UPLOADED, "Downscale it before sending."),
        (LOCAL_FILE, "Downscale it, or raise --max-image-pixels."),
        (STORED, "Downscale it, or raise --max-image-pixels."),
    ):
        with pytest.raises(PayloadTooLarge) as refused:
            open_image(buffer.getvalue(), max_pixels=100, source=source)
        assert refused.value.message == f"Image is 30x20 = 600 pixels; the limit is 100. {advice}"
