"""Everything ``vision-server train`` was asked to do, as one frozen object (the seed's defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vision_server.settings import DEFAULT_MODEL, FIELDS

Scheduler = Literal["constant", "cosine", "linear"]
Optimizer = Literal["adamw", "adamw8bit"]
LogWith = Literal["auto", "tensorboard", "wandb", "none"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"
DEFAULT_CACHE_DIR = Path(str(FIELDS["cache_dir"].default))
# BART's attention and feed-forward linear layers; matched inside the language model only.
LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# DaViT's linear layers (fused qkv, output projection, MLP), added by --train-vision.
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class TrainOptions:
    dataset: Path
    output: Path
    model: str = DEFAULT_MODEL
    revision: str | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = "auto"
    precision: Precision = "auto"
    task: str = DEFAULT_TASK
    caption_ext: str = "txt"
    image_column: str | None = None
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: Scheduler = "constant"
    warmup_steps: int = 0
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    rank: int = 4
    alpha: float = 4.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LANGUAGE_TARGETS
    train_vision: bool = False
    gradient_checkpointing: bool = False
    max_caption_tokens: int = 256
    seed: int = 42
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    val_split: float = 0.0
    val_samples: int = 3
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: Path | None = None
    log_with: LogWith = "auto"
    overwrite: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
        return out


# Options that change the numbers a run computes: a resumed run must use the checkpoint's values,
# or it could not follow the uninterrupted run's loss curve. The rest (where output and logs go,
# how often to save) may change between the stop and the resume.
PLAN_FIELDS = (
    "model", "revision", "task", "caption_ext", "image_column", "epochs", "max_steps", "batch_size",
    "gradient_accumulation", "learning_rate", "lr_scheduler", "warmup_steps", "optimizer", "weight_decay",
    "rank", "alpha",
    "lora_dropout", "target_modules", "train_vision", "max_caption_tokens", "seed", "shuffle_tags",
    "keep_tokens", "caption_dropout", "val_split", "precision",
)  # fmt: skip


def plan_differences(saved: dict[str, Any], options: TrainOptions) -> list[str]:
    """``name: saved -> now`` for each plan option that differs from the checkpoint's."""
    now = options.as_dict()
    return [
        f"--{name.replace('_', '-')}: {saved.get(name)!r} in the checkpoint, {now[name]!r} now"
        for name in PLAN_FIELDS
        if name in saved and saved[name] != now[name]
    ]
