"""The deterministic test-model builder: reproducible files, real words, both layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Florence2ForConditionalGeneration,
    PretrainedConfig,
)

from tests.support.images import noise
from vision_server.florence.layout import FLORENCE_TOKENS, IMAGE_TOKEN
from vision_server.tasks import PROMPTGEN_TASKS
from vision_server.testing._tokenizer import CAPTION_WORDS, build_tokenizer
from vision_server.testing.tiny_model import PRESETS, build_test_adapter, build_test_model, florence2_config

MAX_NEW_TOKENS = 40


IMAGES = (noise(0, (96, 80)), noise(1, (96, 80)), Image.new("RGB", (64, 64), (200, 30, 30)))


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def captions(
    model_dir: Path, image: Image.Image, *, adapter: Path | None = None, beams: int = 1
) -> list[str]:
    """One caption per PromptGen task, decoded and post-processed the way the server does it."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    if adapter is not None:
        model.load_adapter(str(adapter))
    tasks = list(PROMPTGEN_TASKS)
    inputs = processor(text=tasks, images=[image] * len(tasks), padding=True, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=beams, do_sample=False)
    texts = processor.batch_decode(ids, skip_special_tokens=False)
    return [
        processor.post_process_generation(text.replace("<pad>", ""), task=task, image_size=image.size)[task]
        for text, task in zip(texts, PROMPTGEN_TASKS, strict=True)
    ]


@pytest.fixture(scope="module")
def base_captions(tiny_native_dir: Path) -> list[list[str]]:
    return [captions(tiny_native_dir, image) for image in IMAGES]


def test_same_seed_gives_byte_identical_files(
    tiny_native_dir: Path, tiny_original_dir: Path, tmp_path: Path
) -> None:
    assert file_hashes(build_test_model(tmp_path / "native")) == file_hashes(tiny_native_dir)
    original = build_test_model(tmp_path / "original", fmt="original")
    assert file_hashes(original) == file_hashes(tiny_original_dir)


def test_different_seed_changes_only_the_weights(tiny_native_dir: Path, tmp_path: Path) -> None:
    other = file_hashes(build_test_model(tmp_path / "seed1", seed=1))
    same = file_hashes(tiny_native_dir)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in same.items() if k != "model.safetensors"
    }


def test_files_are_world_readable(
    tiny_native_dir: Path, tiny_original_bin_dir: Path, tiny_adapter_dir: Path
) -> None:
    for directory in (tiny_native_dir, tiny_original_bin_dir, tiny_adapter_dir):
        assert {oct(p.stat().st_mode & 0o777) for p in directory.iterdir()} == {"0o644"}


def test_native_tokenizer_layout(tiny_native_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_native_dir)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(FLORENCE_TOKENS))
    assert ids == list(range(ids[0], ids[0] + 1024))
    assert tokenizer.convert_tokens_to_ids("<loc_0>") == tokenizer.convert_tokens_to_ids("<od>") + 4
    assert tokenizer.image_token == IMAGE_TOKEN and tokenizer.image_token_id == ids[-1] + 1
    config = json.loads((tiny_native_dir / "config.json").read_text())
    assert config["image_token_id"] == tokenizer.image_token_id
    assert config["text_config"]["vocab_size"] % 64 == 0
    assert processor.image_processor.size == {"height": 64, "width": 64}
    assert processor.num_image_tokens == 5


def test_every_task_gives_words_and_stops_by_itself(base_captions: list[list[str]]) -> None:
    for per_task in base_captions:
        for caption in per_task:
            words = caption.split()
            assert words, "empty caption"
            assert set(words) <= set(CAPTION_WORDS), caption
            assert len(words) < MAX_NEW_TOKENS - 5  # ended with </s>, not at the token limit


def test_captions_change_with_image_and_task(base_captions: list[list[str]]) -> None:
    for per_task in base_captions:
        assert len(set(per_task)) >= 4, per_task
    for task_index in range(len(PROMPTGEN_TASKS)):
        assert len({per_task[task_index] for per_task in base_captions}) >= 2


def test_beam_search_also_gives_words(tiny_native_dir: Path) -> None:
    beams = captions(tiny_native_dir, IMAGES[0], beams=3)
    assert all(caption.split() for caption in beams)
    assert len(set(beams)) >= 4


def test_without_wordy_the_model_says_nothing_useful(tmp_path: Path) -> None:
    plain = captions(build_test_model(tmp_path / "plain", wordy=False), IMAGES[0])
    assert not any(set(caption.split()) <= set(CAPTION_WORDS) and caption for caption in plain)


def test_adapter_changes_every_caption(
    tiny_native_dir: Path, tiny_adapter_dir: Path, base_captions: list[list[str]]
) -> None:
    adapted = captions(tiny_native_dir, IMAGES[0], adapter=tiny_adapter_dir)
    assert all(a != b for a, b in zip(adapted, base_captions[0], strict=True))
    assert all(caption.split() for caption in adapted)


def test_adapter_is_deterministic(tiny_native_dir: Path, tiny_adapter_dir: Path, tmp_path: Path) -> None:
    again = build_test_adapter(tiny_native_dir, tmp_path / "again")
    assert file_hashes(again) == file_hashes(tiny_adapter_dir)
    assert file_hashes(build_test_adapter(tiny_native_dir, tmp_path / "other", seed=2)) != file_hashes(again)


def test_original_layout_files(tiny_original_dir: Path) -> None:
    config = json.loads((tiny_original_dir / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" in config
    assert config["text_config"]["model_type"] == "florence2_language"
    assert config["vision_config"]["model_type"] == "davit"
    assert not list(tiny_original_dir.glob("*.py"))
    tokenizer_config = json.loads((tiny_original_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["additional_special_tokens"] == list(FLORENCE_TOKENS)
    assert IMAGE_TOKEN not in (tiny_original_dir / "tokenizer.json").read_text()
    with safe_open(str(tiny_original_dir / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
        assert not weights.get_tensor("language_model.final_logits_bias").any()
        assert weights.get_tensor("language_model.model.shared.weight").shape[0] == config["vocab_size"]
    assert "image_projection" in keys and "language_model.lm_head.weight" not in keys
    assert not any(key.startswith("model.") for key in keys)


def test_tokenizer_is_the_same_in_both_layouts() -> None:
    with_image = build_tokenizer(with_image=True)
    without = build_tokenizer(with_image=False)
    assert len(with_image) == len(without) + 1
    sample = "What does the image describe? a red cat <loc_12>"
    assert with_image(sample).input_ids == without(sample).input_ids


@pytest.mark.parametrize(("preset", "millions"), [("base", 231.4), ("large", 770.2)])
def test_real_presets_have_the_real_size(preset: str, millions: float) -> None:
    tokenizer = build_tokenizer(with_image=True)
    config = florence2_config(PRESETS[preset], tokenizer)
    text_config = config.text_config
    assert isinstance(text_config, PretrainedConfig), text_config  # built here, never a dict or None
    assert text_config.vocab_size == 51328
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_rejects_a_non_empty_directory(tiny_native_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        build_test_model(tiny_native_dir)
