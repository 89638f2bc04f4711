"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``): a chat VLM asked through its chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vision_server.generic.family import Family, Loaded, positions_in
from vision_server.images import PixelSpec

# The user message for <CAPTION>, when the client sent no free text.
CAPTION_INSTRUCTION = "Describe this image in one sentence."


class Idefics3(Family):
    """``HuggingFaceTB/SmolVLM-*`` and ``HuggingFaceM4/Idefics3-*``: the prompt (or
    :data:`CAPTION_INSTRUCTION`) is the user's turn after the image, rendered by the processor's
    own chat template; the answer is the assistant's reply alone.

    Each image goes in as one tile at the vision encoder's size (``max_image_size``), without
    the processor's image splitting: a queued image is already that size, and splitting it
    would mean upscaling it first (17 tiles, about 1100 image tokens on SmolVLM, instead of 64).
    """

    name = "idefics3"
    label = "Idefics3 / SmolVLM (Idefics3ForConditionalGeneration)"
    model_types = ("idefics3",)
    architectures = ("Idefics3ForConditionalGeneration",)
    takes_prompt = True
    default_side = 512

    def load(self, directory: Path, dtype: torch.dtype) -> Loaded:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
        return Loaded(model, processor, processor.tokenizer)

    def inputs(self, loaded: Loaded, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        text = chat_prompt(loaded.processor, prompt or CAPTION_INSTRUCTION)
        side = int(loaded.processor.image_processor.max_image_size["longest_edge"])
        return dict(
            loaded.processor(
                text=[text] * len(images),
                images=[[image] for image in images],
                do_image_splitting=False,
                size={"longest_edge": side},
                return_tensors="pt",
            )
        )

    def prompt_length(self, inputs: dict[str, Any]) -> int:
        return int(inputs["input_ids"].shape[1])

    def stop_ids(self, loaded: Loaded) -> set[int]:
        end = loaded.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        unknown = loaded.tokenizer.unk_token_id
        return super().stop_ids(loaded) | ({int(end)} if end is not None and end != unknown else set())

    def text_positions(self, config: dict[str, Any]) -> int | None:
        # The language model's: the chat template, the image's tokens and the answer share them.
        # Rotary positions do not fail past it, but the model was not trained for more.
        return positions_in(config.get("text_config") or {}, "max_position_embeddings", default=None)

    def pixel_spec(self, config: dict[str, Any]) -> PixelSpec:
        side = (config.get("max_image_size") or {}).get("longest_edge", self.default_side)
        return super().pixel_spec(
            {**config, "size": {"height": side, "width": side}, "do_center_crop": False}
        )


def chat_prompt(processor: Any, instruction: str) -> str:
    """One user turn (the image, then ``instruction``) and the assistant's cue, as the model was trained."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True))
