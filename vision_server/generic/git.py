"""GIT (``GitForCausalLM``): image tokens then text in one decoder; a prompt is the caption's start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vision_server.generic.family import CLIP_MEAN, CLIP_STD, Family, Loaded, positions_in


class Git(Family):
    """``microsoft/git-*``: a prompt goes in as ``[CLS]`` + its tokens (no ``[SEP]``, so the model
    continues it), and the answer keeps it, as the model card decodes it."""

    name = "git"
    label = "GIT (GitForCausalLM)"
    model_types = ("git",)
    architectures = ("GitForCausalLM",)
    takes_prompt = True
    keeps_prompt = True
    default_side = 224
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def load(self, directory: Path, dtype: torch.dtype) -> Loaded:
        from transformers import AutoProcessor, GitForCausalLM

        processor = AutoProcessor.from_pretrained(directory)
        model = GitForCausalLM.from_pretrained(directory, dtype=dtype)
        return Loaded(model, processor, processor.tokenizer)

    def inputs(self, loaded: Loaded, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        inputs: dict[str, Any] = {
            "pixel_values": loaded.processor(images=images, return_tensors="pt").pixel_values
        }
        if prompt is not None:
            tokenizer = loaded.tokenizer
            ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
            inputs["input_ids"] = torch.tensor([ids] * len(images))
        return inputs

    def prompt_length(self, inputs: dict[str, Any]) -> int:
        ids = inputs.get("input_ids")
        return 1 if ids is None else int(ids.shape[1])

    def text_positions(self, config: dict[str, Any]) -> int | None:
        # Text tokens only: the image's tokens come before them without position embeddings.
        return positions_in(config, "max_position_embeddings", default=1024)
