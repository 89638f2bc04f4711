"""A deterministic PEFT LoRA for the test models, in native or original key names."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Florence2ForConditionalGeneration

from vision_server.florence.layout import PEFT_PREFIX, original_key

RANK = 4
ALPHA = 8
TARGETS = ["q_proj", "v_proj"]  # BART attention only: DaViT's attention uses a fused `qkv`
A_SCALE, B_SCALE = 1.0, 1.0
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def make_lora(model: Florence2ForConditionalGeneration, *, seed: int) -> PeftModel:
    """Wrap ``model`` with a LoRA whose A and B matrices come from ``seed`` (B is not zero)."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                scale = A_SCALE if ".lora_A." in name else B_SCALE
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(noise * scale / parameter.shape[1] ** 0.5)
    return peft_model


def save_native(peft_model: PeftModel, out: Path) -> None:
    """PEFT's own files, minus the model card, with no machine-specific base model path."""
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    config_path = out / CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = None
    if isinstance(config.get("target_modules"), list):  # PEFT keeps a set: order varies between runs
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_original(peft_model: PeftModel, out: Path) -> None:
    """The same adapter under the key names of the original layout (``language_model.model.…``)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_native(peft_model, Path(tmp))
        state = load_file(Path(tmp) / WEIGHTS)
        (out / CONFIG).write_bytes((Path(tmp) / CONFIG).read_bytes())
    renamed = {_original_adapter_key(key): tensor for key, tensor in state.items()}
    save_file(renamed, out / WEIGHTS, metadata={"format": "pt"})


def _original_adapter_key(key: str) -> str:
    original = original_key(key.removeprefix(PEFT_PREFIX))
    if original is None:
        raise KeyError(f"no original name for adapter key {key}")
    return PEFT_PREFIX + original
