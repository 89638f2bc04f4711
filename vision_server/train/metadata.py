"""The small JSON file beside a trained adapter: what it was trained from, how, and how it ended.

Standard library only (and the stdlib-only ``model_specs``): the server reads it to show
``/model_info`` and ``/v1/status`` for an ``--adapter`` directory, and must not import torch for that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vision_server.atomic_files import replacing
from vision_server.model_specs import adapter_name, is_path_source

METADATA_FILE = "training.json"
FORMAT_VERSION = 1
# Options that name files or folders on the machine that trained (shown by their last part), and
# the model, which is one when it was a local directory.
_PATH_OPTIONS = ("dataset", "output", "cache_dir", "resume")
_MAYBE_PATHS = (*_PATH_OPTIONS, "model")
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
    """What the server shows about an adapter: its folder's name, and how it was trained when
    known. No paths: whoever may ask for the status learns nothing of the server's disk; the
    full path is in the server's start line, and options that were paths show their last part."""
    if not adapter:
        return None
    data = read_metadata(adapter)
    return {"name": adapter_name(adapter), "training": None if data is None else _shown(data)}


def _shown(data: dict[str, Any]) -> dict[str, Any]:
    training = {key: data.get(key) for key in _SHOWN}
    training["base_model"] = _without_path(training["base_model"], always=False)
    options = data.get("options")
    if isinstance(options, dict):
        options = {
            key: _without_path(value, always=key in _PATH_OPTIONS) if key in _MAYBE_PATHS else value
            for key, value in options.items()
        }
    training["options"] = options
    return training


def _without_path(value: Any, *, always: bool) -> Any:
    """A path's last part (``always`` for options that are paths, else for a model that is a
    local directory, not a hub id)."""
    if not isinstance(value, str) or not value or not (always or is_path_source(value)):
        return value
    return adapter_name(value)
