"""Deterministic Florence-2 test models: tiny for tests, real-shaped `base`/`large` for memory and speed work.

No machine the tests run on can reach a model hub, so the package builds its own model: a small BPE
tokenizer, random weights from a fixed seed, and a "wordy" nudge so greedy decoding yields real
words that change with the image, the task and an adapter. The same builder writes the original
remote-code layout of PromptGen v2.0 so the converter can be tested end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    BartConfig,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from vision_server.florence.layout import VOCAB_MULTIPLE, post_processor_config
from vision_server.images import PixelSpec
from vision_server.testing import _adapter, _original, _wordy
from vision_server.testing._model_dir import new_model_dir, quiet_progress_bars
from vision_server.testing._tokenizer import build_tokenizer, clean_saved_config

Preset = Literal["tiny", "base", "large"]
Format = Literal["native", "original"]
Weights = Literal["safetensors", "bin"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REAL_VOCAB_SIZE = 51328  # 51289 real tokens + <image>, padded to a multiple of 64
REAL_ORIGINAL_VOCAB_SIZE = 51289


@dataclass(frozen=True)
class ModelShape:
    """The sizes that differ between presets; everything else follows the real checkpoints."""

    image_size: int
    embed_dim: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    window_size: int
    d_model: int
    layers: int
    attention_heads: int
    ffn_dim: int
    vocab_size: int | None = None  # None: the tokenizer's size rounded up to a multiple of 64
    original_vocab_size: int | None = None  # rows in the original layout; None: every token but <image>
    text_positions: int = 1024


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(
        image_size=64, embed_dim=(8, 16, 16, 32), heads=(1, 2, 2, 4), depths=(1, 1, 1, 1), window_size=4,
        d_model=32, layers=1, attention_heads=2, ffn_dim=64,
    ),
    "base": ModelShape(
        image_size=768, embed_dim=(128, 256, 512, 1024), heads=(4, 8, 16, 32), depths=(1, 1, 9, 1),
        window_size=12, d_model=768, layers=6, attention_heads=12, ffn_dim=3072,
        vocab_size=REAL_VOCAB_SIZE, original_vocab_size=REAL_ORIGINAL_VOCAB_SIZE,
    ),
    "large": ModelShape(
        image_size=768, embed_dim=(256, 512, 1024, 2048), heads=(8, 16, 32, 64), depths=(1, 1, 9, 1),
        window_size=12, d_model=1024, layers=12, attention_heads=16, ffn_dim=4096,
        vocab_size=REAL_VOCAB_SIZE, original_vocab_size=REAL_ORIGINAL_VOCAB_SIZE,
    ),
}  # fmt: skip


def build_test_model(
    out_dir: str | Path,
    *,
    preset: Preset = "tiny",
    fmt: Format = "native",
    seed: int = 0,
    wordy: bool = True,
    weights: Weights = "safetensors",
) -> Path:
    """Write a complete model directory (weights, config, tokenizer, processor) and return its path.

    ``weights="bin"`` (original format only) writes an fp16 ``pytorch_model.bin`` the way the
    microsoft/Florence-2 repositories ship it.
    """
    _check_choices(preset, fmt, weights)
    shape = PRESETS[preset]
    with new_model_dir(out_dir) as out:
        tokenizer = build_tokenizer(with_image=True)
        model = build_native_model(shape, tokenizer, seed=seed, wordy=wordy)
        if fmt == "native":
            _save_native(model, tokenizer, shape, out)
        else:
            rows = shape.original_vocab_size or len(tokenizer) - 1
            _original.save_original(model, shape.image_size, out, vocab_size=rows, weights=weights)
    return out


def _check_choices(preset: str, fmt: str, weights: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if fmt not in ("native", "original"):
        raise ValueError(f"unknown format {fmt!r}; choose 'native' or 'original'")
    if weights not in ("safetensors", "bin") or (weights == "bin" and fmt == "native"):
        raise ValueError(f"weights={weights!r} is not available for the {fmt} format")


def build_native_model(
    shape: ModelShape, tokenizer: PreTrainedTokenizerBase, *, seed: int, wordy: bool
) -> Florence2ForConditionalGeneration:
    """Random weights from ``seed``, the wordy nudge, and mean-filled rows past the real tokens."""
    config = florence2_config(shape, tokenizer)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    real_tokens = len(tokenizer) - 1  # every token but <image>, which the converter adds itself
    with torch.no_grad():
        if wordy:
            _wordy.apply(model, tokenizer, shape.image_size)
        fill_rows_with_mean(model.get_input_embeddings().weight, real_tokens)
    return model


def florence2_config(shape: ModelShape, tokenizer: PreTrainedTokenizerBase) -> Florence2Config:
    """Native config for a preset; BART ids follow the real checkpoints (bos 0, pad 1, eos 2)."""
    vocab = shape.vocab_size or math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = BartConfig(
        vocab_size=vocab, d_model=shape.d_model, max_position_embeddings=shape.text_positions,
        encoder_layers=shape.layers, decoder_layers=shape.layers,
        encoder_attention_heads=shape.attention_heads, decoder_attention_heads=shape.attention_heads,
        encoder_ffn_dim=shape.ffn_dim, decoder_ffn_dim=shape.ffn_dim,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )  # fmt: skip
    vision = {
        "depths": list(shape.depths), "embed_dim": list(shape.embed_dim), "num_heads": list(shape.heads),
        "num_groups": list(shape.heads), "window_size": shape.window_size,
        "projection_dim": shape.d_model, "drop_path_rate": 0.1,
    }  # fmt: skip
    return Florence2Config(
        text_config=text.to_dict(), vision_config=vision, image_token_id=tokenizer.image_token_id
    )


def fill_rows_with_mean(embeddings: torch.Tensor, real_rows: int) -> None:
    """Give padding rows the mean embedding, as the converter does: their logit is never the maximum."""
    if real_rows < embeddings.shape[0]:
        mean = embeddings[:real_rows].float().mean(dim=0)
        embeddings[real_rows:] = mean.to(embeddings.dtype)


def generation_config() -> GenerationConfig:
    """The decoding defaults of the original Florence-2 checkpoints."""
    return GenerationConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2,
        forced_bos_token_id=0, forced_eos_token_id=2,
        num_beams=3, no_repeat_ngram_size=3, early_stopping=True,
    )  # fmt: skip


def preset_pixel_spec(preset: str) -> PixelSpec:
    """The input size and normalisation a preset's model is built with (known without building it)."""
    size = PRESETS[preset].image_size
    return PixelSpec(height=size, width=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def preset_weight_bytes(preset: str, dtype: torch.dtype) -> int:
    """Bytes a preset's weights take loaded in ``dtype``, from its config on the meta device
    (no weights are made: ``large`` would take seconds to build)."""
    config = florence2_config(PRESETS[preset], build_tokenizer(with_image=True))
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    tensors = (*model.parameters(), *model.buffers())
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)


def tiny_pixel_spec() -> PixelSpec:
    return preset_pixel_spec("tiny")


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Resize to a square with bicubic, no crop, ImageNet normalisation (the Florence-2 settings)."""
    square = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil(
        size=square, crop_size=square, do_center_crop=False, resample=3, do_convert_rgb=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        image_seq_length=(image_size // 32) ** 2 + 1,  # spatial tokens + one temporal token
    )  # fmt: skip


def _save_native(
    model: Florence2ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, shape: ModelShape, out: Path
) -> None:
    """save_pretrained for the model and a Florence2Processor that carries the post-processor rules."""
    model.generation_config = generation_config()
    with quiet_progress_bars():
        model.save_pretrained(out)
    processor = Florence2Processor(
        image_processor=image_processor(shape.image_size),
        tokenizer=tokenizer,
        post_processor_config=post_processor_config(),
    )
    processor.save_pretrained(out)
    clean_saved_config(out)


def build_test_adapter(
    model_dir: str | Path, out_dir: str | Path, *, fmt: Format = "native", seed: int = 1
) -> Path:
    """A deterministic LoRA (r=4 on q_proj/v_proj, non-zero B) for the native test model in ``model_dir``.

    ``fmt="original"`` writes the same adapter with the key names it would have had if it had been
    trained on the original remote-code layout.
    """
    with new_model_dir(out_dir) as out:
        model = Florence2ForConditionalGeneration.from_pretrained(model_dir)
        peft_model = _adapter.make_lora(model, seed=seed)
        if fmt == "native":
            _adapter.save_native(peft_model, out)
        else:
            _adapter.save_original(peft_model, out)
    return out
