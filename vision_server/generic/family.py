"""What differs between image-to-text architectures, behind one small interface.

A family turns prepared images (and an optional prompt) into ``generate`` keyword arguments and
says how many leading tokens of each output row are the prompt. Everything else (batching,
decoding options, counting, memory) is shared by :mod:`vision_server.generic.captioner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from vision_server.images import PixelSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Loaded:
    """A model with what it needs to read inputs and write text."""

    model: Any
    processor: Any  # the image processor and the tokenizer are reached through it
    tokenizer: Any


class Family:
    """One architecture: how to load it, feed it and read its output.

    ``default_side`` is the input size assumed while the model's own files are not on disk yet.
    """

    name: ClassVar[str]
    label: ClassVar[str]  # for messages and docs: the family and its model class
    model_types: ClassVar[tuple[str, ...]]  # config.json "model_type" values this family reads
    architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" entries it runs
    takes_prompt: ClassVar[bool] = False
    keeps_prompt: ClassVar[bool] = False  # the answer repeats the prompt (a caption prefix)
    default_side: ClassVar[int] = 224
    default_mean: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    default_std: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)

    def load(self, directory: Path, dtype: torch.dtype) -> Loaded:
        raise NotImplementedError

    def inputs(self, loaded: Loaded, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        """Keyword arguments of ``generate`` for these images, all with the same prompt."""
        raise NotImplementedError

    def prompt_length(self, inputs: dict[str, Any]) -> int:
        """How many leading tokens of every output row were given, not generated."""
        return 1  # the start token alone

    def stop_ids(self, loaded: Loaded) -> set[int]:
        """Tokens that end a caption (a row without one ran out of tokens)."""
        return _ids(loaded.model.generation_config.eos_token_id)

    def text_positions(self, config: dict[str, Any]) -> int | None:
        """Positions the text decoder holds, from ``config.json``: the given tokens (the prompt's,
        and the start token) and the generated ones share them. None when the config says nothing."""
        return None

    def pixel_spec(self, config: dict[str, Any]) -> PixelSpec:
        """The fixed size images are prepared to, from the image processor's saved config."""
        height, width = _fixed_size(config, self.default_side)
        return PixelSpec(
            height=height,
            width=width,
            mean=_triple(config.get("image_mean", self.default_mean)),
            std=_triple(config.get("image_std", self.default_std)),
            resample=Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC))),
            rescale=float(config.get("rescale_factor", 1 / 255)),
        )

    def default_spec(self) -> PixelSpec:
        return self.pixel_spec({})


def caption_room(positions: int, prompt_length: int) -> int:
    """The most tokens a decoder of ``positions`` positions can add after ``prompt_length`` given ones.

    The last generated token is never fed back, so it needs no position: a decoder of 512
    positions that starts from one token generates 512 (measured on BLIP, GIT, GPT-2 and
    Florence-2, whose position tables fail one token later with an IndexError).
    """
    return positions - prompt_length + 1


def positions_in(config: dict[str, Any], *keys: str, default: int | None) -> int | None:
    """The first of ``keys`` set in ``config`` (a whole number above 0), else ``default``."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _fixed_size(config: dict[str, Any], default: int) -> tuple[int, int]:
    """(height, width) the processor ends at: the crop when it crops, else its resize target."""
    crop = config.get("crop_size")
    size = crop if config.get("do_center_crop") and crop else config.get("size")
    if isinstance(size, int):
        return size, size
    if not isinstance(size, dict):
        return default, default
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    side = size.get("shortest_edge") or size.get("longest_edge") or default
    return int(side), int(side)


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    first, second, third = (float(v) for v in values)
    return (first, second, third)


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
