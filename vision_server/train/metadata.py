"""The small JSON file beside a trained adapter: what it was trained from, how, and how it ended.

Standard library only: the server reads it to show ``/model_info`` and ``/v1/status`` for an
``--adapter`` directory, and must not import torch for that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vision_server.atomic_files import replacing

METADATA_FILE = "training.json"
FORMAT_VERSION = 1
_SHOWN = ("base_model", "revision", "task", "steps", "epochs", "final_train_loss", "final_val_loss")


def write_metadata(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``training.json`` atomically (a temp file renamed over the target)."""
    path = directory / METADATA_FILE
    text = json.dumps({"format": FORMAT_VERSION, **data}, indent=2, sort_keys=True) + "\n"
    with replacing(path, directory / f".{METADATA_FILE}.tmp") as temp:
        temp.write_text(text, "utf-8")
    return path


def read_metadata(directory: Path | str) -> dict[str, Any] | None:
    """The adapter's training metadata, or None when it has none (or it cannot be read)."""
    try:
        data = json.loads((Path(directory).expanduser() / METADATA_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def adapter_summary(adapter: str | None) -> dict[str, Any] | None:
    """What the server shows about its ``--adapter``: the path, and how it was trained when known."""
    if not adapter:
        return None
    data = read_metadata(adapter)
    training = None
    if data is not None:
        training = {key: data.get(key) for key in _SHOWN}
        training["options"] = data.get("options")
    return {"path": adapter, "training": training}
