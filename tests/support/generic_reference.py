"""What the Hugging Face classes answer when called directly, the way their model cards show.

The generic backend must give exactly these answers for the same image, prompt and options;
this module does not use the backend's code, only transformers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BlipForConditionalGeneration,
    GitForCausalLM,
    VisionEncoderDecoderModel,
)

from vision_server.generic.idefics3 import CAPTION_INSTRUCTION


@functools.cache
def _load(directory: Path, family: str) -> tuple[Any, Any, Any]:
    """(model, processor or image processor, tokenizer), loaded once per directory."""
    if family == "vision-encoder-decoder":
        model = VisionEncoderDecoderModel.from_pretrained(directory).eval()
        return model, AutoImageProcessor.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    classes: dict[str, Any] = {  # model classes with no common base that has from_pretrained
        "blip": BlipForConditionalGeneration,
        "git": GitForCausalLM,
        "idefics3": AutoModelForImageTextToText,
    }
    processor = AutoProcessor.from_pretrained(directory)
    return classes[family].from_pretrained(directory).eval(), processor, processor.tokenizer


def reference_caption(
    directory: Path, family: str, image: Image.Image, prompt: str | None = None, **generate: Any
) -> str:
    """The caption of ``image`` (already at the model's input size) by a direct ``generate``."""
    model, processor, tokenizer = _load(directory, family)
    with torch.inference_mode():
        if family == "blip":  # model card: processor(image, text) → generate → decode everything
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            return str(
                processor.decode(model.generate(**inputs, **generate)[0], skip_special_tokens=True)
            ).strip()
        if family == "git":  # model card: [CLS] + prefix ids, no [SEP]; decode everything
            pixel_values = processor(images=image, return_tensors="pt").pixel_values
            extra = {}
            if prompt is not None:
                ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
                extra["input_ids"] = torch.tensor([ids])
            out = model.generate(pixel_values=pixel_values, **extra, **generate)
            return str(processor.decode(out[0], skip_special_tokens=True)).strip()
        if family == "vision-encoder-decoder":
            pixel_values = processor(images=image, return_tensors="pt").pixel_values
            out = model.generate(pixel_values=pixel_values, **generate)
            return str(tokenizer.decode(out[0], skip_special_tokens=True)).strip()
        # idefics3: the chat template with the image and the instruction; decode the reply only
        content = [{"type": "image"}, {"type": "text", "text": prompt or CAPTION_INSTRUCTION}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        out = model.generate(**inputs, **generate)
        return str(
            processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        ).strip()
