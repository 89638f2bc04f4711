"""A Florence-2 model's input size and normalisation, known before its weights are loaded.

Requests arrive while the model is unloaded, and their images are resized on the decode pool
before the queue; so the spec is read from the checkpoint's ``preprocessor_config.json`` when it
is on disk (a local directory, a built test model, the hub cache), without downloading anything.
Original checkpoints keep it in ``preprocessor_config.json``; transformers 5 saves it under
``image_processor`` in ``processor_config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from vision_server.florence.source import TEST_MODEL_VERSION, TEST_PREFIX, is_test_model
from vision_server.images import PixelSpec

log = logging.getLogger(__name__)

# Every published Florence-2 checkpoint (base, large, PromptGen v1.5/v2.0) uses these.
FLORENCE_DEFAULT = PixelSpec(
    height=768,
    width=768,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    resample=Image.Resampling.BICUBIC,
    rescale=1 / 255,
)
CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")


def pixel_spec(processor: Any) -> PixelSpec:
    """The resize/normalise settings of a loaded Florence-2 processor's image processor."""
    image_processor = processor.image_processor
    size = image_processor.size
    return PixelSpec(
        height=int(size["height"]),
        width=int(size["width"]),
        mean=_triple(image_processor.image_mean),
        std=_triple(image_processor.image_std),
        resample=Image.Resampling(image_processor.resample),
        rescale=float(image_processor.rescale_factor),
    )


def spec_from_config(config: dict[str, Any]) -> PixelSpec:
    """The same settings read from a ``preprocessor_config.json`` (original or native layout)."""
    size = config.get("size") or config.get("crop_size") or {}
    if not isinstance(size, dict):
        size = {"height": size, "width": size}
    side = size.get("shortest_edge")
    return PixelSpec(
        height=int(size.get("height", side or FLORENCE_DEFAULT.height)),
        width=int(size.get("width", side or FLORENCE_DEFAULT.width)),
        mean=_triple(config.get("image_mean", FLORENCE_DEFAULT.mean)),
        std=_triple(config.get("image_std", FLORENCE_DEFAULT.std)),
        resample=Image.Resampling(int(config.get("resample", FLORENCE_DEFAULT.resample))),
        rescale=float(config.get("rescale_factor", FLORENCE_DEFAULT.rescale)),
    )


def spec_before_load(model: str, *, revision: str | None, cache_dir: Path) -> PixelSpec:
    """``model``'s spec from files already on disk, else the Florence-2 default (never downloads)."""
    if is_test_model(model):
        return _test_model_spec(model[len(TEST_PREFIX) :], cache_dir)
    config = _config_on_disk(model, revision=revision)
    return FLORENCE_DEFAULT if config is None else _read(config)


def _read(config: Path) -> PixelSpec:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        return spec_from_config(data.get("image_processor", data))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("cannot read %s (%s); assuming the Florence-2 default input size", config, exc)
        return FLORENCE_DEFAULT


def _config_on_disk(model: str, *, revision: str | None) -> Path | None:
    local = Path(model).expanduser()
    if local.is_dir():
        return _local_config(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(model, name, revision=revision) for name in CONFIG_FILES]
    except Exception:  # an id the hub library rejects: the load will say what is wrong
        return None
    return next((Path(path) for path in cached if isinstance(path, str)), None)


def _local_config(directory: Path) -> Path | None:
    return next((directory / name for name in CONFIG_FILES if (directory / name).is_file()), None)


def _test_model_spec(preset: str, cache_dir: Path) -> PixelSpec:
    """A built test model's file, or (not built yet) its preset's size, so no request is resized twice."""
    built = _local_config(cache_dir / "test-models" / f"{preset}-v{TEST_MODEL_VERSION}")
    if built is not None:
        return _read(built)
    from vision_server.testing.tiny_model import PRESETS, preset_pixel_spec

    return preset_pixel_spec(preset) if preset in PRESETS else FLORENCE_DEFAULT  # unknown: the load says so


def _triple(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(v) for v in values)
    return (first, second, third)
