"""PEFT adapters trained on the original layout: detect them and rename their weights to the native keys.

Split from `convert` because an adapter conversion touches only the adapter's own files: it reuses
the checkpoint key table (`convert.rename_weights`) but none of the model, tokenizer or config work.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vision_server.errors import ModelSourceError
from vision_server.florence.convert import (
    ADAPTER_WEIGHT_FILES,
    Layout,
    read_weight_file,
    rename_weights,
    writing_into,
)
from vision_server.florence.layout import PEFT_PREFIX

logger = logging.getLogger(__name__)


def adapter_layout(state: dict[str, torch.Tensor]) -> Layout:
    """Native adapter keys start ``base_model.model.model.`` (or ``...lm_head``); original ones do not."""
    native_roots = (PEFT_PREFIX + "model.", PEFT_PREFIX + "lm_head.")
    return "native" if all(key.startswith(native_roots) for key in state) else "original"


def convert_adapter(adapter_dir: Path, dst: Path) -> Path:
    """Copy a PEFT adapter trained on the original layout with its weight names made native."""
    adapter_dir, dst = Path(adapter_dir), Path(dst)
    started = time.perf_counter()
    weights = adapter_weights_file(adapter_dir)
    state = rename_weights(read_weight_file(weights), adapter_dir, prefix=PEFT_PREFIX)
    with writing_into(dst):
        for path in adapter_dir.iterdir():
            if path.is_file() and path.name not in ADAPTER_WEIGHT_FILES:
                shutil.copy2(path, dst / path.name)
        tensors = {key: value.contiguous() for key, value in state.items()}
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    logger.info("converted adapter %s -> %s in %.2f s", adapter_dir, dst, time.perf_counter() - started)
    return dst


def adapter_weights_file(adapter_dir: Path) -> Path:
    """The adapter's weights file, after checking that ``adapter_dir`` is a PEFT adapter."""
    if not adapter_dir.is_dir():
        raise ModelSourceError(f"adapter directory {adapter_dir} does not exist (or is not a directory)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSourceError(f"{adapter_dir} has no adapter_config.json, so it is not a PEFT adapter")
    for name in ADAPTER_WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise ModelSourceError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")
