"""Original -> native conversion: same generations as native, a cache that converts once, clear errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Florence2ForConditionalGeneration

from tests.support.images import noise
from vision_server.errors import ConversionError, ModelSourceError
from vision_server.florence import conversion_cache
from vision_server.florence.conversion_cache import (
    conversions_performed,
    ensure_native,
    ensure_native_adapter,
)
from vision_server.florence.convert import convert_checkpoint, detect_layout
from vision_server.florence.layout import native_key, original_key
from vision_server.tasks import PROMPTGEN_TASKS
from vision_server.testing._tokenizer import build_tokenizer
from vision_server.testing.tiny_model import PRESETS, florence2_config


def generate_ids(
    model_dir: Path, *, beams: int, dtype: torch.dtype = torch.float32, adapter: Path | None = None
) -> list[list[int]]:
    """Token ids for every PromptGen task (one batch, two alternating images), computed in fp32."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).float()
    if adapter is not None:
        model.load_adapter(str(adapter))
    tasks = list(PROMPTGEN_TASKS)
    images = [noise(i % 2, (90, 70)) for i in range(len(tasks))]
    inputs = processor(text=tasks, images=images, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=30, num_beams=beams, do_sample=False).tolist()


@pytest.fixture(scope="module")
def converted_dir(tiny_original_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_checkpoint(tiny_original_dir, tmp_path_factory.mktemp("converted") / "native")


@pytest.fixture(scope="module")
def converted_bin_dir(tiny_original_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_checkpoint(tiny_original_bin_dir, tmp_path_factory.mktemp("converted-bin") / "native")


@pytest.fixture
def original_copy(tiny_original_dir: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(tiny_original_dir, tmp_path / "original"))


# --- layout and key table ---------------------------------------------------------------------------


def test_detect_layout(tiny_native_dir: Path, tiny_original_dir: Path, tiny_original_bin_dir: Path) -> None:
    assert detect_layout(tiny_native_dir) == "native"
    assert detect_layout(tiny_original_dir) == "original"
    assert detect_layout(tiny_original_bin_dir) == "original"


@pytest.mark.parametrize("preset", ["tiny", "large"])
def test_key_table_round_trips_every_native_weight(preset: str) -> None:
    config = florence2_config(PRESETS[preset], build_tokenizer(with_image=True))
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    for key in model.state_dict():
        original = original_key(key)
        assert original is not None and native_key(original) == key, key


# --- conversion output --------------------------------------------------------------------------------


def test_converted_files_load_without_remote_code(converted_dir: Path) -> None:
    assert detect_layout(converted_dir) == "native"
    config = json.loads((converted_dir / "config.json").read_text())
    assert "auto_map" not in config and config["dtype"] == "float32"
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert processor.tokenizer.image_token_id == config["image_token_id"]
    assert processor.post_processor_config["pure_text"] == {}
    generation = json.loads((converted_dir / "generation_config.json").read_text())
    assert generation["num_beams"] == 3 and generation["no_repeat_ngram_size"] == 3
    assert generation["forced_bos_token_id"] == 0 and generation["forced_eos_token_id"] == 2


def test_converted_weights_equal_the_native_build(converted_dir: Path, tiny_native_dir: Path) -> None:
    native = load_file(tiny_native_dir / "model.safetensors")
    converted = load_file(converted_dir / "model.safetensors")
    assert native.keys() == converted.keys()
    assert all(torch.equal(native[key], converted[key]) for key in native)


@pytest.mark.parametrize("beams", [1, 3])
def test_converted_model_generates_the_same_ids(
    converted_dir: Path, tiny_native_dir: Path, beams: int
) -> None:
    assert generate_ids(converted_dir, beams=beams) == generate_ids(tiny_native_dir, beams=beams)


def test_fp16_bin_source_converts_and_stays_fp16(converted_bin_dir: Path, tiny_native_dir: Path) -> None:
    assert json.loads((converted_bin_dir / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(converted_bin_dir / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}  # noqa: SIM118
    for beams in (1, 3):
        expected = generate_ids(tiny_native_dir, beams=beams, dtype=torch.float16)
        assert generate_ids(converted_bin_dir, beams=beams, dtype=torch.float16) == expected


def test_microsoft_tokenizer_without_florence_tokens(original_copy: Path, tmp_path: Path) -> None:
    """microsoft/Florence-2 ships only vocab.json + merges.txt; the converter adds the 1024 tokens."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (original_copy / name).unlink()
    out = convert_checkpoint(original_copy, tmp_path / "native")
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert tokenizer.convert_tokens_to_ids("<loc_0>") == tokenizer.convert_tokens_to_ids("<od>") + 4
    assert tokenizer.image_token_id == json.loads((out / "config.json").read_text())["image_token_id"]
    location = tokenizer.convert_tokens_to_ids(["<loc_7>"])
    assert tokenizer.decode(location, skip_special_tokens=True) == ""  # marked special


# --- adapters -----------------------------------------------------------------------------------------


def test_native_adapter_is_used_as_is(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    assert ensure_native_adapter(tiny_adapter_dir, tmp_path) == tiny_adapter_dir


def test_original_adapter_converts_to_the_native_one(
    tiny_original_adapter_dir: Path, tiny_adapter_dir: Path, tiny_native_dir: Path, tmp_path: Path
) -> None:
    before = conversions_performed()
    converted = ensure_native_adapter(tiny_original_adapter_dir, tmp_path)
    assert ensure_native_adapter(tiny_original_adapter_dir, tmp_path) == converted
    assert conversions_performed() == before + 1
    expected = load_file(tiny_adapter_dir / "adapter_model.safetensors")
    actual = load_file(converted / "adapter_model.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    with_native = generate_ids(tiny_native_dir, beams=1, adapter=tiny_adapter_dir)
    assert generate_ids(tiny_native_dir, beams=1, adapter=converted) == with_native
    assert with_native != generate_ids(tiny_native_dir, beams=1)


# --- cache ----------------------------------------------------------------------------------------------


def test_ensure_native_returns_native_sources_unchanged(tiny_native_dir: Path, tmp_path: Path) -> None:
    assert ensure_native(tiny_native_dir, tmp_path) == tiny_native_dir
    assert not list(tmp_path.iterdir())


def test_ensure_native_converts_once(
    original_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="vision_server.florence")  # convert and conversion_cache
    before = conversions_performed()
    first = ensure_native(original_copy, cache)
    assert conversions_performed() == before + 1 and "converted" in caplog.text
    second = ensure_native(original_copy, cache)
    assert second == first and conversions_performed() == before + 1
    assert "using cached conversion" in caplog.text
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp dirs left behind


def test_changed_source_is_converted_again(original_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = ensure_native(original_copy, cache)
    before = conversions_performed()
    config = original_copy / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = ensure_native(original_copy, cache)
    assert second != first and conversions_performed() == before + 1


def test_failed_conversion_leaves_no_cache_entry(
    original_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: Path, dst: Path) -> Path:
        (dst / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion_cache, "convert_checkpoint", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ensure_native(original_copy, cache)
    assert not list(cache.iterdir())


def test_racing_processes_share_one_entry(original_copy: Path, tmp_path: Path) -> None:
    results: list[Path] = []
    cache = tmp_path / "cache"
    threads = [
        threading.Thread(target=lambda: results.append(ensure_native(original_copy, cache))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in cache.iterdir()] == [results[0].name]
    assert detect_layout(results[0]) == "native"


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        ensure_native(tmp_path / "nope", tmp_path / "cache")


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        detect_layout(tmp_path)


def test_other_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSourceError, match="not a Florence-2 model"):
        detect_layout(tmp_path)


def test_unknown_layout(original_copy: Path) -> None:
    config = json.loads((original_copy / "config.json").read_text())
    config["text_config"]["model_type"] = "t5"
    config["vision_config"]["model_type"] = "vit"
    (original_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="unknown Florence-2 layout"):
        detect_layout(original_copy)


def test_truncated_safetensors(original_copy: Path, tmp_path: Path) -> None:
    weights = original_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors.*download it again"):
        convert_checkpoint(original_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "given").mkdir()
    with pytest.raises(ConversionError):
        convert_checkpoint(original_copy, tmp_path / "given")
    assert not list((tmp_path / "given").iterdir())


def test_truncated_bin(tiny_original_bin_dir: Path, tmp_path: Path) -> None:
    source = Path(shutil.copytree(tiny_original_bin_dir, tmp_path / "src"))
    weights = source / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin"):
        convert_checkpoint(source, tmp_path / "out")


def test_unmapped_key(original_copy: Path, tmp_path: Path) -> None:
    weights = original_copy / "model.safetensors"
    state = load_file(weights)
    state["vision_tower.head.weight"] = torch.zeros(2, 2)
    save_file(state, weights)
    with pytest.raises(ConversionError, match=r"no rule .*vision_tower\.head\.weight"):
        convert_checkpoint(original_copy, tmp_path / "out")


def test_non_zero_logits_bias(original_copy: Path, tmp_path: Path) -> None:
    weights = original_copy / "model.safetensors"
    state = load_file(weights)
    state["language_model.final_logits_bias"][0, 5] = 1.0
    save_file(state, weights)
    with pytest.raises(ConversionError, match="final_logits_bias is not zero"):
        convert_checkpoint(original_copy, tmp_path / "out")


def test_tied_copy_that_differs_is_ignored_with_a_warning(
    original_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = original_copy / "model.safetensors"
    state = load_file(weights)
    state["language_model.lm_head.weight"] = state["language_model.model.shared.weight"] + 1.0
    save_file(state, weights)
    out = convert_checkpoint(original_copy, tmp_path / "out")
    assert "lm_head.weight differs" in caplog.text
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_missing_tokenizer_files(original_copy: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (original_copy / name).unlink()
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert_checkpoint(original_copy, tmp_path / "out")


def test_missing_weights(original_copy: Path, tmp_path: Path) -> None:
    (original_copy / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="has no weights"):
        convert_checkpoint(original_copy, tmp_path / "out")


def test_native_source_and_busy_destination(
    tiny_native_dir: Path, original_copy: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match="already in the native layout"):
        convert_checkpoint(tiny_native_dir, tmp_path / "out")
    with pytest.raises(ConversionError, match="not an empty directory"):
        convert_checkpoint(original_copy, original_copy)
