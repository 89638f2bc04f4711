"""Florence-2's inputs, built as its processor builds them but from the server's own pieces.

The engine hands over pixels already decoded and resized (uint8, off the event loop), so only
the normalisation and the prompt's token ids are left; both the captioner and the training
loop feed the model through here, so what a LoRA is trained on is what the server sends.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vision_server.images import PixelSpec


def pixel_values(batch: np.ndarray, spec: PixelSpec, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W], rescaled and normalised on ``device``.

    The uint8 batch is a quarter of the floats' size to move; the arithmetic (float32 multiply,
    subtract, divide) is that of transformers' CLIP image processor, so the values match it.
    """
    values = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).to(torch.float32)
    values = values * torch.tensor(spec.rescale, dtype=torch.float32, device=device)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((values - mean) / std).contiguous()


def prompt_ids(processor: Any, tasks: list[str], length: int | None = None) -> Any:
    """Token ids exactly as ``Florence2Processor`` builds them: <image>×N, <s>, prompt, </s>.

    ``length`` pads every row to that many tokens (fixed shapes for compiled decoding).
    """
    tokenizer = processor.tokenizer
    image_tokens = processor.image_token * processor.num_image_tokens
    prompts = processor._construct_prompts(tasks)
    texts = [image_tokens + tokenizer.bos_token + prompt + tokenizer.eos_token for prompt in prompts]
    padding: dict[str, Any] = {"padding": "max_length", "max_length": length} if length else {"padding": True}
    return tokenizer(texts, add_special_tokens=False, return_tensors="pt", **padding)
