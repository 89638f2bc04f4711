"""FlorenceCaptioner on the real tiny Florence-2: batches, options, adapters, cache, memory, errors."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from tests.support.images import noise
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.errors import InvalidTask, ModelLoadError
from vision_server.florence import conversion_cache
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.pixels import FLORENCE_DEFAULT
from vision_server.images import PixelSpec, PreparedImage, fit_image
from vision_server.runtime import engine_config
from vision_server.settings import Settings
from vision_server.tasks import PROMPTGEN_TASKS, normalize_task
from vision_server.testing.tiny_model import tiny_pixel_spec

SHORT = GenerationOptions(max_new_tokens=40)


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> PreparedImage:
    return fit_image(noise(seed, size), tiny_pixel_spec())


def captioner_for(model: Path | str, cache: Path, **kwargs: object) -> FlorenceCaptioner:
    return FlorenceCaptioner(str(model), cache_dir=cache, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def loaded(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FlorenceCaptioner:
    captioner = captioner_for(tiny_native_dir, tmp_path_factory.mktemp("cache"))
    captioner.load()
    return captioner


def test_mixed_task_batch_of_eight_equals_eight_single_calls(loaded: FlorenceCaptioner) -> None:
    items = [CaptionItem(picture(n, (40 + 3 * n, 50)), PROMPTGEN_TASKS[n % 7], SHORT) for n in range(8)]
    batched = loaded.caption(items)
    singles = [loaded.caption([item])[0] for item in items]
    assert batched == singles


@pytest.mark.parametrize("beams", [1, 3])
def test_every_task_gives_non_empty_words(loaded: FlorenceCaptioner, beams: int) -> None:
    options = GenerationOptions(max_new_tokens=40, num_beams=beams)
    captions = loaded.caption([CaptionItem(picture(1), task, options) for task in PROMPTGEN_TASKS])
    assert all(c.text.strip() and "<" not in c.text for c in captions)
    assert len({c.text for c in captions}) > 1  # the task changes the caption


def test_image_changes_the_caption(loaded: FlorenceCaptioner) -> None:
    texts = {loaded.caption([CaptionItem(picture(seed), "<CAPTION>", SHORT)])[0].text for seed in range(6)}
    assert len(texts) > 1


def test_max_new_tokens_bounds_the_length(loaded: FlorenceCaptioner) -> None:
    long = loaded.caption(
        [CaptionItem(picture(2), "<MORE_DETAILED_CAPTION>", GenerationOptions(max_new_tokens=60))]
    )
    short = loaded.caption(
        [CaptionItem(picture(2), "<MORE_DETAILED_CAPTION>", GenerationOptions(max_new_tokens=4))]
    )
    assert short[0].completion_tokens <= 4 < long[0].completion_tokens or long[0].finish_reason == "stop"
    assert short[0].finish_reason == "length"
    assert len(short[0].text) < len(long[0].text)


def test_sampling_and_confidence(loaded: FlorenceCaptioner) -> None:
    sampled = GenerationOptions(max_new_tokens=20, num_beams=1, temperature=1.5, top_p=0.95)
    texts = {loaded.caption([CaptionItem(picture(3), "<CAPTION>", sampled)])[0].text for _ in range(6)}
    assert len(texts) > 1
    scored = loaded.caption(
        [CaptionItem(picture(3), "<CAPTION>", GenerationOptions(20, with_confidence=True))]
    )[0]
    assert scored.confidence is not None and 0.0 < scored.confidence <= 1.0
    assert scored.prompt_tokens > 0


def test_original_layout_converts_once_then_hits_the_cache(
    tiny_original_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = conversion_cache.conversions_performed()
    first = captioner_for(tiny_original_dir, tmp_path)
    first.load()
    text = first.caption([CaptionItem(picture(4), "<CAPTION>", SHORT)])[0].text
    first.unload()
    assert conversion_cache.conversions_performed() == before + 1
    second = captioner_for(tiny_original_dir, tmp_path)
    second.load()
    assert conversion_cache.conversions_performed() == before + 1  # no conversion work the second time
    assert second.caption([CaptionItem(picture(4), "<CAPTION>", SHORT)])[0].text == text
    second.unload()
    logging.getLogger(__name__).info("conversion log: %s", [r.getMessage() for r in caplog.records])


# peft's PeftModel reads model.is_gradient_checkpointing, which transformers 5 deprecates (peft's call).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_changes_output_and_original_adapter_matches(
    tiny_native_dir: Path,
    tiny_adapter_dir: Path,
    tiny_original_adapter_dir: Path,
    loaded: FlorenceCaptioner,
    tmp_path: Path,
) -> None:
    items = [CaptionItem(picture(n), "<DETAILED_CAPTION>", SHORT) for n in range(4)]
    base = [c.text for c in loaded.caption(items)]
    native = captioner_for(tiny_native_dir, tmp_path, adapter=str(tiny_adapter_dir))
    native.load()
    adapted = [c.text for c in native.caption(items)]
    native.unload()
    original = captioner_for(tiny_native_dir, tmp_path, adapter=str(tiny_original_adapter_dir))
    original.load()
    assert [c.text for c in original.caption(items)] == adapted
    original.unload()
    assert adapted != base


def test_twenty_load_unload_cycles_free_the_model(tiny_native_dir: Path, tmp_path: Path) -> None:
    captioner = captioner_for(tiny_native_dir, tmp_path)
    process = psutil.Process()
    rss: list[int] = []
    for cycle in range(20):
        captioner.load()
        captioner.caption([CaptionItem(picture(cycle), "<CAPTION>", SHORT)])
        model_ref = weakref.ref(captioner._loaded.model)  # type: ignore[union-attr]
        captioner.unload()
        gc.collect()
        assert model_ref() is None, f"the model survived unload in cycle {cycle}"
        rss.append(process.memory_info().rss)
    growth_mb = (max(rss[1:]) - rss[0]) / 2**20
    logging.getLogger(__name__).info("RSS per cycle (MB): %s", [r // 2**20 for r in rss])
    assert growth_mb < 50, f"RSS grew by {growth_mb:.0f} MB over 20 cycles"


@pytest.mark.parametrize("case", ["missing", "not_a_model", "corrupt", "unknown_layout"])
def test_load_errors_are_clear(case: str, tiny_native_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    if case == "not_a_model":
        model.mkdir()
        (model / "notes.txt").write_text("hello")
    elif case == "corrupt":
        import shutil

        shutil.copytree(tiny_native_dir, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "unknown_layout":
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
    captioner = captioner_for(model, tmp_path / "cache")
    with pytest.raises(ModelLoadError) as info:
        captioner.load()
    message = str(info.value)
    assert str(model) in message and "Traceback" not in message
    assert not captioner.is_loaded


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidTask) as info:
        normalize_task("<OD>", PROMPTGEN_TASKS)
    assert all(task in str(info.value) for task in PROMPTGEN_TASKS)
    assert normalize_task("mix_caption_plus", PROMPTGEN_TASKS) == "<MIXED_CAPTION_PLUS>"


def test_fast_preprocessing_matches_the_transformers_processor(loaded: FlorenceCaptioner) -> None:
    from vision_server.florence.inputs import pixel_values, prompt_ids
    from vision_server.florence.pixels import pixel_spec

    processor = loaded._loaded.processor  # type: ignore[union-attr]
    images = [noise(7, (90, 30)), noise(8, (30, 90))]
    tasks = ["<CAPTION>", "<MIXED_CAPTION_PLUS>"]
    reference = processor(text=tasks, images=images, return_tensors="pt", padding=True)
    batch = np.stack([fit_image(image, pixel_spec(processor)).pixels for image in images])
    ours = pixel_values(batch, pixel_spec(processor), torch.device("cpu")).numpy()
    assert np.abs(ours - reference["pixel_values"].numpy()).max() < 1e-5
    ids = prompt_ids(processor, tasks)
    assert ids["input_ids"].tolist() == reference["input_ids"].tolist()
    assert ids["attention_mask"].tolist() == reference["attention_mask"].tolist()


@pytest.mark.parametrize("spec", [FLORENCE_DEFAULT, tiny_pixel_spec()], ids=["768", "64"])
def test_uint8_pixels_normalise_to_exactly_the_float_pixels_of_before(spec: PixelSpec) -> None:
    """Resizing to uint8 first and normalising the batch later changes no value (captions stay equal)."""
    from vision_server.florence.inputs import pixel_values

    images = [noise(seed, (1000 + 37 * seed, 700)) for seed in range(3)]

    def before(image: Image.Image) -> np.ndarray:  # the float path queued jobs used to carry
        resized = image.resize((spec.width, spec.height), resample=spec.resample)
        array = np.asarray(resized, dtype=np.float32) * np.float32(spec.rescale)
        array -= np.asarray(spec.mean, dtype=np.float32)
        array /= np.asarray(spec.std, dtype=np.float32)
        return array.transpose(2, 0, 1)

    batch = np.stack([fit_image(image, spec).pixels for image in images])
    assert batch.dtype == np.uint8 and batch.shape == (3, spec.height, spec.width, 3)
    ours = pixel_values(batch, spec, torch.device("cpu")).numpy()
    assert np.array_equal(ours, np.stack([before(image) for image in images]))


def test_pixel_spec_is_known_before_loading(
    tiny_native_dir: Path, tiny_original_dir: Path, loaded: FlorenceCaptioner, tmp_path: Path
) -> None:
    for model in (tiny_native_dir, tiny_original_dir, "test:tiny"):
        fresh = captioner_for(model, tmp_path / "empty-cache")
        assert fresh.pixel_spec == loaded.pixel_spec and not fresh.is_loaded
    assert not (tmp_path / "empty-cache" / "test-models").exists()  # nothing was built to find out
    assert captioner_for("someone/not-downloaded", tmp_path).pixel_spec == FLORENCE_DEFAULT


def test_items_prepared_for_another_size_are_resized_again(
    loaded: FlorenceCaptioner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vision_server.florence.captioner")
    image = noise(9, (300, 200))
    assumed = fit_image(image, FLORENCE_DEFAULT)  # prepared while the model's size was unknown
    assert assumed.pixels.shape == (768, 768, 3) and assumed.original_size == (300, 200)
    caption = loaded.caption([CaptionItem(assumed, "<CAPTION>", SHORT)])[0]
    assert caption.text and "resizing a queued 768x768 image to the model's 64x64" in caplog.text


def test_batch_size_default_depends_on_the_device(tmp_path: Path) -> None:
    cpu = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cpu")
    gpu = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cuda:0")
    assert engine_config(Settings(), cpu).max_batch_size == 16
    assert engine_config(Settings(), gpu).max_batch_size == 32
    assert engine_config(Settings(max_batch_size=5), gpu).max_batch_size == 5
