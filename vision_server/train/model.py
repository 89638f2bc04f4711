"""The base model to train on, its precision, and the LoRA wrapped around it."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_server.devices import pick_device
from vision_server.errors import ModelSourceError
from vision_server.florence.pixels import pixel_spec
from vision_server.florence.source import resolve_model_dir
from vision_server.images import PixelSpec
from vision_server.train.options import VISION_TARGETS, TrainOptions


class ModelError(RuntimeError):
    """The base model cannot be loaded (or cannot be trained the way the options ask)."""


@dataclass(frozen=True)
class Precision:
    """Where and how the forward pass runs: fp32 on the CPU, bf16 (or fp16 with a scaler) on CUDA."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (autocast) and the frozen base weights' dtype
    scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def pick_precision(device_name: str, requested: str) -> Precision:
    try:
        device = pick_device(device_name)
    except Exception as exc:
        raise ModelError(str(exc)) from None
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        requested = "fp32" if device.type != "cuda" else "bf16" if bf16 else "fp16"
    if device.type != "cuda" and requested != "fp32":
        raise ModelError(f"--precision {requested} needs a CUDA device; on {device} use fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return Precision(device, dtype, scaler=dtype == torch.float16)


@dataclass
class BaseModel:
    model: Any
    processor: Any
    pixels: PixelSpec
    directory: Path  # the native directory the weights came from
    resolved_revision: str | None  # the hub snapshot's commit, when it came from the hub


def load_base(options: TrainOptions, precision: Precision) -> BaseModel:
    """The native model and processor; every failure becomes one :class:`ModelError` that names it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from vision_server.florence.conversion_cache import ensure_native

    hf_logging.disable_progress_bar()
    try:
        source = resolve_model_dir(options.model, revision=options.revision, cache_dir=options.cache_dir)
        native = ensure_native(source, options.cache_dir / "converted")
        processor = AutoProcessor.from_pretrained(native)
        model = AutoModelForImageTextToText.from_pretrained(
            native, dtype=precision.dtype, attn_implementation="sdpa"
        )
    except ModelSourceError as exc:
        raise ModelError(f"cannot load model {options.model!r}: {exc}") from None
    except Exception as exc:  # corrupt or foreign files surface as many library-specific types
        raise ModelError(f"cannot load model {options.model!r}: {type(exc).__name__}: {exc}") from None
    revision = source.name if source.parent.name == "snapshots" else None
    model = model.to(precision.device)  # type: ignore[arg-type]  # transformers types .to oddly
    return BaseModel(model, processor, pixel_spec(processor), native, revision)


def target_pattern(names: tuple[str, ...], train_vision: bool) -> str:
    """A PEFT regex: ``names`` inside the language model, plus DaViT's linear layers if asked."""
    language = rf"model\.language_model\..*\.({'|'.join(map(re.escape, names))})"
    if not train_vision:
        return language
    return rf"({language})|(model\.vision_tower\..*\.({'|'.join(VISION_TARGETS)}))"


def add_lora(base: BaseModel, options: TrainOptions) -> Any:
    """Freeze the base, wrap it with a fresh LoRA (fp32 weights, whatever the base's dtype)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft accepts floats; typed int
        lora_dropout=options.lora_dropout,
        target_modules=target_pattern(options.target_modules, options.train_vision),
    )
    torch.manual_seed(options.seed)  # LoRA A matrices are initialised from the global generator
    with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model = get_peft_model(base.model, config)
        except ValueError as exc:  # no module matched
            raise ModelError(f"--target-modules {','.join(options.target_modules)}: {exc}") from None
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
