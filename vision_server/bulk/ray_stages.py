"""The CPU and model stages on Ray: decode/resize in ``map_batches`` tasks, caption in actors.

The preparation is bulk's :func:`~vision_server.bulk.prepare.prepare_record`; each caption actor
runs its own :class:`~vision_server.engine.scheduler.Engine` (built as the server and the local
command build it) on an event loop thread of its own, so batching, batch splitting on errors,
tasks, adapters and generation options are exactly those of the local path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from typing import Any

import numpy as np

from vision_server.bulk.pipeline import model_pixel_spec
from vision_server.bulk.prepare import Prepared, as_image, prepare_record
from vision_server.bulk.ray_rows import batch_rows, row_record, row_tasks
from vision_server.images import PixelSpec
from vision_server.settings import Settings

ENGINE_REQUEST_TIMEOUT = 7 * 24 * 3600.0  # Ray's backpressure bounds the wait, not a deadline


def prepare_batch(batch: dict[str, Any], spec: PixelSpec, max_pixels: int) -> dict[str, Any]:
    """Read and resize each image still to caption; a failure becomes the row's ``error``.

    The image bytes are dropped here; ``pixels`` holds the model-size RGB bytes (H x W x 3,
    empty for rows with nothing to caption, so skipped rows cost nothing downstream).
    """
    rows = batch_rows(batch)
    pixels, errors = [], []
    for row in rows:
        error, ready = str(row["error"]), b""
        if not error and row_tasks(row):
            prepared = prepare_record(row_record(row, with_data=True), spec, max_pixels)
            if isinstance(prepared, Prepared):
                ready = prepared.pixels.tobytes()
            else:
                error = prepared
        pixels.append(ready)
        errors.append(error)
    out = {name: batch[name] for name in batch if name not in ("data", "error")}
    out["error"] = np.array(errors, dtype=object)
    out["pixels"] = np.array(pixels, dtype=object)
    return out


class CaptionActor:
    """One model, loaded once per actor; ``__call__`` captions a batch of prepared rows.

    Ray may call it from a few threads at once (``max_concurrency``): every call submits to the
    same engine, which batches across calls, so the model never waits for the next batch.
    """

    def __init__(self, settings: Settings, torch_threads: int | None = None) -> None:
        from vision_server.engine.scheduler import Engine
        from vision_server.errors import VisionServerError
        from vision_server.runtime import build_captioner, engine_config

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        captioner = build_captioner(settings)
        config = dataclasses.replace(
            engine_config(settings, captioner), idle_timeout=-1, request_timeout=ENGINE_REQUEST_TIMEOUT
        )
        self.options = settings.generation_defaults()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vision-ray-engine", daemon=True).start()
        self.engine = Engine(captioner, config)
        self._wait(self.engine.start())
        try:
            self._wait(self.engine.load())
        except VisionServerError as exc:
            raise RuntimeError(f"the model did not load: {exc.message}") from None
        spec = model_pixel_spec(captioner)
        self.shape = (spec.height, spec.width, 3)

    def _wait(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        captions, errors = self._wait(self._caption(batch))
        out = {name: batch[name] for name in batch if name not in ("pixels", "error")}
        out["error"] = np.array(errors, dtype=object)
        out["captions"] = np.array(captions, dtype=object)
        return out

    async def _caption(self, batch: dict[str, Any]) -> tuple[list[str], list[str]]:
        rows = batch_rows(batch)
        results = await asyncio.gather(*(self._caption_row(row) for row in rows))
        return [json.dumps(texts, ensure_ascii=False) for texts, _ in results], [e for _, e in results]

    async def _caption_row(self, row: dict[str, Any]) -> tuple[dict[str, str], str]:
        from vision_server.bulk.pipeline import _describe
        from vision_server.captioner import CaptionItem

        tasks, error = row_tasks(row), str(row["error"])
        if error or not tasks:
            return {}, error
        pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(self.shape)
        image = as_image(Prepared(pixels, (0, 0)))
        display = row_record(row).display
        results = await asyncio.gather(
            *(
                self.engine.submit(
                    CaptionItem(image, task, self.options), request_id=display, wait_for_room=True
                )
                for task in tasks
            ),
            return_exceptions=True,
        )
        texts: dict[str, str] = {}
        problems: list[str] = []
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(_describe(task, result, len(tasks)))
            else:
                texts[task] = result.text
        return texts, "; ".join(problems)
