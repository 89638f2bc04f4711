"""FlorenceCaptioner on the real tiny Florence-2: batches, options, adapters, cache, memory, errors."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.errors import InvalidTask, ModelLoadError
from vision_server.florence import conversion_cache
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.tasks import PROMPTGEN_TASKS, normalize_task

SHORT = GenerationOptions(max_new_tokens=40)


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


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
    from vision_server.florence.captioner import pixel_spec, prompt_ids
    from vision_server.images import to_pixels

    processor = loaded._loaded.processor  # type: ignore[union-attr]
    images = [picture(7, (90, 30)), picture(8, (30, 90))]
    tasks = ["<CAPTION>", "<MIXED_CAPTION_PLUS>"]
    reference = processor(text=tasks, images=images, return_tensors="pt", padding=True)
    ours = np.stack([to_pixels(image, pixel_spec(processor)) for image in images])
    assert np.abs(ours - reference["pixel_values"].numpy()).max() < 1e-5
    ids = prompt_ids(processor, tasks)
    assert ids["input_ids"].tolist() == reference["input_ids"].tolist()
    assert ids["attention_mask"].tolist() == reference["attention_mask"].tolist()


def test_preprocess_prepares_pixels_once_the_model_size_is_known(loaded: FlorenceCaptioner) -> None:
    item = loaded.preprocess(CaptionItem(picture(9), "<CAPTION>", SHORT))
    assert item.pixels is not None and item.pixels.shape == (3, 64, 64) and item.pixels.dtype == np.float32
    assert loaded.caption([item]) == loaded.caption([CaptionItem(picture(9), "<CAPTION>", SHORT)])
