"""Write a native test model in the original remote-code layout of PromptGen v2.0 / microsoft Florence-2.

The files imitate what transformers 4.x wrote for those repositories: a ``florence2_language`` +
``davit`` config with ``auto_map`` (the .py files themselves are left out), original weight names,
a tokenizer without ``<image>`` whose Florence tokens are listed under ``additional_special_tokens``,
and the old-style preprocessor config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from transformers import Florence2ForConditionalGeneration, PreTrainedConfig

from vision_server.florence.layout import (
    DROPPED_ORIGINAL_KEY,
    FLORENCE_TOKENS,
    TRANSPOSED_ORIGINAL_KEY,
    original_key,
)
from vision_server.testing._tokenizer import build_tokenizer, train_bpe

TRANSFORMERS_4X = "4.44.2"
TIED_COPIES = (
    "language_model.model.encoder.embed_tokens.weight",
    "language_model.model.decoder.embed_tokens.weight",
)
# PromptGen's fp32 file is one embedding larger than the model (3.29 GB for 3.08 GB of weights).
SAFETENSORS_COPY = TIED_COPIES[0]
SHARED = "language_model.model.shared.weight"
LM_HEAD = "language_model.lm_head.weight"


def save_original(
    model: Florence2ForConditionalGeneration,
    image_size: int,
    out: Path,
    *,
    vocab_size: int,
    weights: Literal["safetensors", "bin"] = "safetensors",
) -> None:
    """Write every file of the original layout; ``vocab_size`` rows of the embeddings are kept."""
    dtype = torch.float16 if weights == "bin" else torch.float32
    state = original_state_dict(model, vocab_size, dtype)
    if weights == "bin":
        # One storage for all four tied names, as torch.save of the 4.x model wrote them.
        state |= {name: state[SHARED] for name in (*TIED_COPIES, LM_HEAD)}
        torch.save(state, out / "pytorch_model.bin")
    else:
        # safetensors cannot alias: one extra embedding copy, no tied output head.
        state[SAFETENSORS_COPY] = state[SHARED].clone()
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    _write_json(out / "config.json", original_config(model, vocab_size, dtype))
    _write_json(out / "generation_config.json", {"num_beams": 3, "transformers_version": TRANSFORMERS_4X})
    _write_json(out / "preprocessor_config.json", original_preprocessor_config(image_size, model))
    write_original_tokenizer(out)


def original_state_dict(
    model: Florence2ForConditionalGeneration, vocab_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Native weights under original names, without the tied embedding copies and output head."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" or ".embed_tokens." in name:
            continue
        key = original_key(name)
        if key is None:
            raise KeyError(f"no original name for {name}")
        value = tensor.t() if key == TRANSPOSED_ORIGINAL_KEY else tensor
        value = value[:vocab_size] if key == SHARED else value
        state[key] = value.to(dtype).contiguous().clone()
    state[DROPPED_ORIGINAL_KEY] = torch.zeros(1, vocab_size, dtype=dtype)
    return state


def original_config(model: Florence2ForConditionalGeneration, vocab_size: int, dtype: torch.dtype) -> dict:
    """config.json as PromptGen ships it (florence2_language + davit, remote code in auto_map)."""
    text = model.config.text_config
    vision = model.config.vision_config
    if not isinstance(vision, PreTrainedConfig):  # a built model always has its config object
        raise TypeError(f"unexpected vision_config {type(vision).__name__}")
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        },
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "ignore_index": -100,
        "is_encoder_decoder": True, "model_type": "florence2",
        "projection_dim": vision.projection_dim,
        "text_config": _text_config(text, vocab_size),
        "vision_config": _vision_config(model.config.vision_config),
        "vocab_size": vocab_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": TRANSFORMERS_4X,
    }  # fmt: skip


def _text_config(text: Any, vocab_size: int) -> dict:
    """The BART fields of the 4.x ``Florence2LanguageConfig``, generation defaults included."""
    copied = (
        "activation_dropout", "activation_function", "attention_dropout", "d_model",
        "decoder_attention_heads", "decoder_ffn_dim", "decoder_layerdrop", "decoder_layers", "dropout",
        "encoder_attention_heads", "encoder_ffn_dim", "encoder_layerdrop", "encoder_layers", "init_std",
        "max_position_embeddings", "scale_embedding",
    )  # fmt: skip
    config = {name: getattr(text, name) for name in copied}
    config |= {
        "model_type": "florence2_language", "vocab_size": vocab_size,
        "num_hidden_layers": text.encoder_layers,
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
        "forced_bos_token_id": 0, "forced_eos_token_id": 2, "early_stopping": True, "num_beams": 3,
        "no_repeat_ngram_size": 3, "max_length": 20, "is_encoder_decoder": True, "tie_word_embeddings": True,
        "classifier_dropout": 0.0, "use_cache": True,
    }  # fmt: skip
    return config


def _vision_config(vision: Any) -> dict:
    """The DaViT config of the remote code, with its nested embedding settings."""
    temporal = {"type": "COSINE", "max_temporal_embeddings": vision.max_temporal_embeddings}
    return {
        "model_type": "davit",
        "drop_path_rate": vision.drop_path_rate,
        "patch_size": list(vision.patch_size),
        "patch_stride": list(vision.patch_stride),
        "patch_padding": list(vision.patch_padding),
        "patch_prenorm": list(vision.patch_prenorm),
        "enable_checkpoint": False,
        "dim_embed": list(vision.embed_dim),
        "num_heads": list(vision.num_heads),
        "num_groups": list(vision.num_groups),
        "depths": list(vision.depths),
        "window_size": vision.window_size,
        "projection_dim": vision.projection_dim,
        "visual_temporal_embedding": temporal,
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": vision.max_position_embeddings},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }


def original_preprocessor_config(image_size: int, model: Florence2ForConditionalGeneration) -> dict:
    """preprocessor_config.json in the 4.x style, pointing at the remote processor."""
    square = {"height": image_size, "width": image_size}
    return {
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "_valid_processor_keys": ["images", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                                  "do_normalize", "image_mean", "image_std", "return_tensors"],
        "crop_size": square, "do_center_crop": False, "do_convert_rgb": None, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "CLIPImageProcessor", "image_seq_length": (image_size // 32) ** 2 + 1,
        "image_std": [0.229, 0.224, 0.225], "processor_class": "Florence2Processor", "resample": 3,
        "rescale_factor": 1 / 255, "size": square,
    }  # fmt: skip


def write_original_tokenizer(out: Path) -> None:
    """tokenizer.json + vocab.json/merges.txt + a 4.x tokenizer_config.json, without ``<image>``."""
    tokenizer = build_tokenizer(with_image=False)
    tokenizer.save_pretrained(out)
    vocab, merges = train_bpe()
    _write_json(out / "vocab.json", vocab)
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}  # fmt: skip
    extra = {"additional_special_tokens": list(FLORENCE_TOKENS)}
    _write_json(out / "special_tokens_map.json", specials | extra)
    _write_json(out / "tokenizer_config.json", _tokenizer_config_4x(tokenizer, specials))


def _tokenizer_config_4x(tokenizer: Any, specials: dict[str, str]) -> dict:
    """The 4.x spelling: Florence tokens under additional_special_tokens, each one in added_tokens_decoder."""
    decoder = {
        str(index): {"content": token.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }  # fmt: skip
    return specials | {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(FLORENCE_TOKENS), "clean_up_tokenization_spaces": True,
        "errors": "replace", "model_max_length": 1024, "processor_class": "Florence2Processor",
        "tokenizer_class": "BartTokenizer", "trim_offsets": True,
    }  # fmt: skip


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
