"""Checkpoints and the final adapter: PEFT files, plus what a resume needs to continue exactly.

A checkpoint directory is itself a loadable adapter (``adapter_config.json``, weights,
``training.json``) with ``trainer_state.pt`` beside it: optimizer, scheduler and grad-scaler
state, the torch random generators and the step. Directories appear by rename, so a crash never
leaves a half-written one that a later ``--resume`` would trust.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_server.train.metadata import write_metadata

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


@dataclass
class ResumeState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    history: list[dict[str, Any]]
    options: dict[str, Any]
    epoch_sum: float  # the running loss of the epoch the checkpoint fell in
    epoch_count: int
    train_images: list[str]


def save_adapter(model: Any, directory: Path, base_model: str) -> None:
    """PEFT's adapter files without the auto-written model card; the base model named in the config."""
    model.save_pretrained(str(directory))
    (directory / "README.md").unlink(missing_ok=True)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(
    output: Path, step: int, model: Any, metadata: dict[str, Any], state: dict[str, Any], keep: int
) -> Path:
    """``output/checkpoints/step-NNNNNNNN``; older ones beyond ``keep`` are removed."""
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_adapter(model, staging, metadata["base_model"])
    write_metadata(staging, metadata)
    torch.save(state, staging / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest checkpoint in the output dir ``path``."""
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"--resume {path}: neither a checkpoint nor an output folder with checkpoints"
        )
    return found[-1]


def read_state(path: Path) -> ResumeState:
    """The checkpoint's trainer state (not its weights)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return ResumeState(
        step=int(state["step"]),
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        scaler=state.get("scaler"),
        cpu_rng=state["cpu_rng"],
        cuda_rng=state.get("cuda_rng"),
        history=list(state.get("history", [])),
        options=dict(state["options"]),
        epoch_sum=float(state.get("epoch_sum", 0.0)),
        epoch_count=int(state.get("epoch_count", 0)),
        train_images=list(state.get("train_images", [])),
    )


def load_adapter_weights(path: Path, model: Any) -> None:
    """Put the checkpoint's adapter weights into ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))


def write_final(output: Path, model: Any, metadata: dict[str, Any]) -> None:
    """The finished adapter at the top of ``output``: weights first, the config last, so a
    directory with ``adapter_config.json`` is always complete."""
    staging = output / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging, metadata["base_model"])
    write_metadata(staging, metadata)
    for name in ("adapter_model.safetensors", "training.json", "adapter_config.json"):
        (staging / name).replace(output / name)
    shutil.rmtree(staging, ignore_errors=True)
