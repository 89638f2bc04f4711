"""A model's ``config.json`` and image processor settings, read before its weights are loaded.

The backend and the input size must be known when the server starts (requests are resized on
the decode pool while the model is still unloaded), so they come from the small JSON files: a
local directory's, the hub cache's, or (for ``--backend auto`` with a hub id that is not cached
yet) ``config.json`` alone fetched from the hub. Nothing here downloads weights.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vision_server.florence.source import is_test_model

log = logging.getLogger(__name__)

IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
FETCH_TIMEOUT = 5.0  # seconds for the one config.json request of --backend auto


def model_config(model: str, *, revision: str | None, fetch: bool) -> dict[str, Any] | None:
    """``config.json`` of ``model`` from disk, else (``fetch``) from the hub; None when unavailable."""
    if is_test_model(model):
        return None
    path = _on_disk(model, "config.json", revision=revision)
    if path is not None:
        return _read_json(path)
    return _fetched_config(model, revision=revision) if fetch else None


def image_processor_config(model: str | Path, *, revision: str | None) -> dict[str, Any] | None:
    """The image processor's saved settings (either file layout), from disk only."""
    for name in IMAGE_PROCESSOR_FILES:
        path = _on_disk(str(model), name, revision=revision)
        data = _read_json(path) if path is not None else None
        if data is not None:
            nested = data.get("image_processor")
            return nested if isinstance(nested, dict) else data
    return None


def _on_disk(model: str, name: str, *, revision: str | None) -> Path | None:
    local = Path(model).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, name, revision=revision)
    except Exception:  # not a hub id: the load says what is wrong with it
        return None
    return Path(cached) if isinstance(cached, str) else None


def _fetched_config(model: str, *, revision: str | None) -> dict[str, Any] | None:
    """``config.json`` from the hub in one short request (HF_ENDPOINT, token and HF_HUB_OFFLINE
    honoured); None when it cannot be had. No retries: a server must not wait half a minute to
    start because the network is down, and the load that follows reports the real problem."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if constants.HF_HUB_OFFLINE:
        return None
    text = _hub_config_text(constants.ENDPOINT, model, revision)
    try:
        data = json.loads(text) if text is not None else None
    except ValueError:
        log.info("cannot read the config.json of %s the hub sent to pick a backend", model)
        return None
    return data if isinstance(data, dict) else None


@functools.lru_cache(maxsize=32)
def _hub_config_text(endpoint: str, model: str, revision: str | None) -> str | None:
    """The body of one request for ``config.json``, asked once per process: planning a
    ``caption`` run and building its model then decide by the same answer (a failure too),
    and a slow hub is waited on once."""
    try:
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers

        url = f"{endpoint}/{model}/resolve/{quote(revision or 'main', safe='')}/config.json"
        response = get_session().get(
            url, headers=build_hf_headers(), timeout=FETCH_TIMEOUT, follow_redirects=True
        )
        if response.status_code != 200:
            log.info(
                "cannot fetch config.json of %s to pick a backend (HTTP %d)", model, response.status_code
            )
            return None
        return str(response.text)
    except Exception as exc:  # offline, unknown id: the load reports it properly
        log.info("cannot fetch config.json of %s to pick a backend (%s)", model, type(exc).__name__)
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None
