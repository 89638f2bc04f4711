"""Checkpoints and the final adapter: PEFT files, plus what a resume needs to continue exactly.

A checkpoint directory is itself a loadable adapter (``adapter_config.json``, weights,
``training.json``) with ``trainer_state.pt`` beside it: optimizer, scheduler and grad-scaler
state, the torch random generators and the step. Directories appear by rename, so a crash never
leaves a half-written one that a later ``--resume`` would trust; and they go by rename too (to a
hidden name, then deleted), so a crash while one is deleted never leaves a torn one under its
name. A write that fails (a full disk) removes what it had written and raises
:class:`~vision_server.disk_full.DiskFull` naming the checkpoint or adapter file.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_server.disk_full import raise_as_disk_full
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
    """``output/checkpoints/step-NNNNNNNN``; older ones beyond ``keep`` are removed, and so are
    the hidden leftovers of a run killed while it wrote or deleted one."""
    root = output / CHECKPOINTS
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith(".step-") and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        save_adapter(model, staging, metadata["base_model"])
        write_metadata(staging, metadata)
        _save_state(state, staging / STATE_FILE)

    _written_or_removed(write, staging, final)
    _remove(final)
    staging.rename(final)
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into memory, then one plain write: a full disk is an ``OSError`` saying
    so, not torch's ``iostream error``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder by first renaming it to a hidden name: a kill in the middle of
    the delete leaves a leftover the next save sweeps, never a torn checkpoint under its name."""
    if not checkpoint.exists():
        return
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    checkpoint.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _written_or_removed(write: Callable[[], None], staging: Path, named: Path) -> None:
    """Run ``write`` (which fills ``staging``); when it fails, remove ``staging`` (a full disk
    gets its space back) and raise a full disk as :class:`DiskFull` naming ``named``, the folder
    or file the user knows, whatever library it came through."""
    try:
        write()
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise_as_disk_full(named, exc)


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

    def write() -> None:
        staging.mkdir(parents=True)
        save_adapter(model, staging, metadata["base_model"])
        write_metadata(staging, metadata)

    _written_or_removed(write, staging, output)
    for name in ("adapter_model.safetensors", "training.json", "adapter_config.json"):
        (staging / name).replace(output / name)
    shutil.rmtree(staging, ignore_errors=True)
