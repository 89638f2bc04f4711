"""BLIP captioning (``BlipForConditionalGeneration``): an optional prompt is the caption's start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vision_server.generic.family import CLIP_MEAN, CLIP_STD, Family, Loaded, positions_in


class Blip(Family):
    """``Salesforce/blip-image-captioning-*``: the text decoder continues the prompt, which stays
    at the start of the answer (as the model card's example prints it)."""

    name = "blip"
    label = "BLIP (BlipForConditionalGeneration)"
    model_types = ("blip",)
    architectures = ("BlipForConditionalGeneration",)
    takes_prompt = True
    keeps_prompt = True
    default_side = 384
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def load(self, directory: Path, dtype: torch.dtype) -> Loaded:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        processor = AutoProcessor.from_pretrained(directory)
        model = BlipForConditionalGeneration.from_pretrained(directory, dtype=dtype)
        return Loaded(model, processor, processor.tokenizer)

    def inputs(self, loaded: Loaded, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        if prompt is None:
            return dict(loaded.processor(images=images, return_tensors="pt"))
        # [CLS] prompt [SEP]: generate() swaps [CLS] for the decoder's start token and drops [SEP].
        return dict(loaded.processor(images=images, text=[prompt] * len(images), return_tensors="pt"))

    def prompt_length(self, inputs: dict[str, Any]) -> int:
        ids = inputs.get("input_ids")
        return 1 if ids is None else int(ids.shape[1]) - 1

    def stop_ids(self, loaded: Loaded) -> set[int]:
        return {int(loaded.model.config.text_config.sep_token_id)}

    def text_positions(self, config: dict[str, Any]) -> int | None:
        # BlipTextConfig's default when the saved config leaves it out.
        return positions_in(config.get("text_config") or {}, "max_position_embeddings", default=512)
