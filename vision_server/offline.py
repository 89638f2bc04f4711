"""Captioning files in-process through the same engine the server uses (no HTTP)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.engine.scheduler import Engine
from vision_server.errors import VisionServerError
from vision_server.images import prepare_image
from vision_server.runtime import build_captioner, engine_config
from vision_server.settings import Settings
from vision_server.tasks import normalize_task


async def caption_files(settings: Settings, paths: list[Path], task: str) -> list[Path]:
    """Print "path<TAB>caption" per image (errors on stderr); return the paths that failed."""
    captioner = build_captioner(settings)
    task = normalize_task(task, captioner.tasks)
    options = settings.generation_defaults()
    engine = Engine(captioner, engine_config(settings, captioner))
    await engine.start()
    try:
        results = await asyncio.gather(*(_one(engine, settings, path, task, options) for path in paths))
    finally:
        await engine.stop(grace=0)
    failed = []
    for path, (text, error) in zip(paths, results, strict=True):
        if error is None:
            print(f"{path}\t{text}", flush=True)
        else:
            print(f"{path}: {error}", file=sys.stderr)
            failed.append(path)
    return failed


async def _one(
    engine: Engine, settings: Settings, path: Path, task: str, options: GenerationOptions
) -> tuple[str, str | None]:
    try:
        spec, limit = engine.pixel_spec, settings.max_image_pixels
        image = await asyncio.to_thread(lambda: prepare_image(path.read_bytes(), spec, max_pixels=limit))
        caption = await engine.submit(CaptionItem(image, task, options), request_id=path.name)
    except VisionServerError as exc:
        return "", exc.message
    return caption.text, None
