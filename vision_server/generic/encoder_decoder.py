"""``VisionEncoderDecoderModel``: an image encoder (ViT, DeiT, Swin...) and a text decoder (GPT-2...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vision_server.generic.family import Family, Loaded, positions_in


class VisionEncoderDecoder(Family):
    """The classic image-captioning checkpoints (``nlpconnect/vit-gpt2-image-captioning``). They
    take no prompt; their files hold an image processor and a tokenizer, not one processor."""

    name = "vision-encoder-decoder"
    label = "vision-encoder-decoder (VisionEncoderDecoderModel, e.g. ViT + GPT-2)"
    model_types = ("vision-encoder-decoder",)
    architectures = ("VisionEncoderDecoderModel",)
    default_side = 224

    def load(self, directory: Path, dtype: torch.dtype) -> Loaded:
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        image_processor = AutoImageProcessor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = VisionEncoderDecoderModel.from_pretrained(directory, dtype=dtype)
        return Loaded(model, image_processor, tokenizer)

    def inputs(self, loaded: Loaded, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        return {"pixel_values": loaded.processor(images=images, return_tensors="pt").pixel_values}

    def stop_ids(self, loaded: Loaded) -> set[int]:
        decoder_eos = loaded.model.config.decoder.eos_token_id
        return super().stop_ids(loaded) or ({int(decoder_eos)} if decoder_eos is not None else set())

    def text_positions(self, config: dict[str, Any]) -> int | None:
        # GPT-2 saves n_positions; BERT-like and TrOCR decoders max_position_embeddings.
        decoder = config.get("decoder") or {}
        default = 1024 if decoder.get("model_type") == "gpt2" else None  # GPT2Config's default
        return positions_in(decoder, "n_positions", "max_position_embeddings", default=default)
