"""How much memory a model will take before it is loaded, from files already on disk.

The memory budget must be checked before a load, so this never downloads, builds or converts
anything: a hub id that is not in the local hub cache has no estimate (None). Test models that
are not built yet are sized from their preset's config on the meta device (no weights made).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vision_server.florence.convert import ADAPTER_WEIGHT_FILES
from vision_server.florence.source import TEST_MODEL_VERSION, TEST_PREFIX, is_test_model
from vision_server.weights import WeightsFileError, estimate_bytes, loaded_bytes, read_tensors, weight_files

log = logging.getLogger(__name__)

# PEFT casts fp16/bf16 adapter weights up to float32 when it loads them (autocast_adapter_dtype).
ADAPTER_DTYPE = torch.float32


def model_dir_on_disk(spec: str, *, revision: str | None, cache_dir: Path) -> Path | None:
    """The directory holding ``spec``'s files when they are here already, else None."""
    if is_test_model(spec):
        built = cache_dir / "test-models" / f"{spec[len(TEST_PREFIX) :]}-v{TEST_MODEL_VERSION}"
        return built if (built / "config.json").is_file() else None
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(spec, "config.json", revision=revision)
    except Exception:  # not a hub id: the load will say what is wrong with it
        return None
    return Path(config).parent if isinstance(config, str) else None


def source_label(spec: str) -> str:
    """The name a base is known by when captioners compare bases: a directory's resolved path,
    else the spec as given (a hub id, a test model)."""
    local = Path(spec).expanduser()
    return str(local.resolve()) if not is_test_model(spec) and local.is_dir() else spec


def florence_bytes(spec: str, *, revision: str | None, cache_dir: Path, dtype: torch.dtype) -> int | None:
    """Estimated bytes of a Florence-2 checkpoint loaded in ``dtype``; None when unknown.

    An original-layout checkpoint is read from its converted copy when one is cached (what the
    load reads), else from its own files less what the conversion drops.
    """
    directory = model_dir_on_disk(spec, revision=revision, cache_dir=cache_dir)
    if directory is None:
        preset = spec[len(TEST_PREFIX) :]
        return _unbuilt_test_model_bytes(preset, dtype) if is_test_model(spec) else None
    from vision_server.errors import ModelSourceError
    from vision_server.florence.conversion_cache import cached_native

    try:
        native = cached_native(directory, cache_dir / "converted")
    except (ModelSourceError, OSError):  # not a Florence-2 directory: the load reports it
        native = directory
    if native is not None:
        return estimate_bytes(weight_files(native), dtype)
    return _original_bytes(directory, dtype)


def _original_bytes(directory: Path, dtype: torch.dtype) -> int | None:
    """The original layout stores tied embeddings three times and a zero bias the native model
    lacks; count what the converted model will hold (its few padding rows of vocabulary aside)."""
    from vision_server.florence.convert import (
        DROPPED_ORIGINAL_KEY,
        LM_HEAD_KEY,
        TIED_COPY_KEYS,
        read_config,
    )

    files = weight_files(directory)
    if not files:
        return None
    text_config = read_config(directory).get("text_config") or {}
    dropped = {DROPPED_ORIGINAL_KEY, *TIED_COPY_KEYS}
    if text_config.get("tie_word_embeddings", True):
        dropped.add(LM_HEAD_KEY)
    total = 0
    for path in files:
        try:
            tensors = read_tensors(path)
        except WeightsFileError:
            total += path.stat().st_size
            continue
        total += loaded_bytes((t for name, t in tensors.items() if name not in dropped), dtype)
    return total


def adapter_bytes(adapter_dir: Path) -> int | None:
    """Estimated bytes of a PEFT adapter once attached (unmerged); None without weight files."""
    return estimate_bytes(weight_files(adapter_dir, ADAPTER_WEIGHT_FILES), ADAPTER_DTYPE)


def _unbuilt_test_model_bytes(preset: str, dtype: torch.dtype) -> int | None:
    from vision_server.testing.tiny_model import PRESETS, preset_weight_bytes

    return preset_weight_bytes(preset, dtype) if preset in PRESETS else None
