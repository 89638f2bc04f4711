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

from vision_server.bulk.prepare import prepare_record
from vision_server.bulk.ray_rows import batch_rows, row_record, row_tasks
from vision_server.errors import VisionServerError
from vision_server.images import PixelSpec, PreparedImage
from vision_server.settings import Settings, SettingsError

ENGINE_REQUEST_TIMEOUT = 7 * 24 * 3600.0  # Ray's backpressure bounds the wait, not a deadline


def prepare_batch(batch: dict[str, Any], spec: PixelSpec, max_pixels: int) -> dict[str, Any]:
    """Read and resize each image still to caption; a failure becomes the row's ``error``.

    The image bytes are dropped here; ``pixels`` holds the model-size RGB bytes (H x W x 3,
    empty for rows with nothing to caption, so skipped rows cost nothing downstream) and
    ``width``/``height`` the image's own size (tasks that answer with boxes scale to it).
    """
    rows = batch_rows(batch)
    pixels, errors, widths, heights = [], [], [], []
    for row in rows:
        error, ready, size = str(row["error"]), b"", (0, 0)
        if not error and row_tasks(row):
            prepared = prepare_record(row_record(row, with_data=True), spec, max_pixels)
            if isinstance(prepared, PreparedImage):
                ready, size = prepared.pixels.tobytes(), prepared.original_size
            else:
                error = prepared
        pixels.append(ready)
        errors.append(error)
        widths.append(size[0])
        heights.append(size[1])
    out = {name: batch[name] for name in batch if name not in ("data", "error")}
    out["error"] = np.array(errors, dtype=object)
    out["pixels"] = np.array(pixels, dtype=object)
    out["width"] = np.array(widths, dtype=np.int64)
    out["height"] = np.array(heights, dtype=np.int64)
    return out


class CaptionActor:
    """One model, loaded once per actor; ``__call__`` captions a batch of prepared rows.

    Ray may call it from a few threads at once (``max_concurrency``): every call submits to the
    same engine, which batches across calls, so the model never waits for the next batch.
    """

    def __init__(self, settings: Settings, torch_threads: int | None = None) -> None:
        from vision_server.engine.scheduler import Engine
        from vision_server.runtime import build_captioner, engine_config

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        # Why this actor has no model: a setting its build found bad (an adapter gone since the
        # driver built the same captioner). Said with the rows, as a failed load is: a failed
        # constructor would end the run as "the Ray run failed", its cause in Ray's traceback.
        self.unbuilt = ""
        try:
            captioner = build_captioner(settings)
        except SettingsError as exc:
            self.unbuilt = str(settings.located(exc))
            return
        config = dataclasses.replace(
            engine_config(settings, captioner),
            idle_timeout=-1,
            request_timeout=ENGINE_REQUEST_TIMEOUT,
            memory_budget=None,  # one model per actor, loaded once: a server's budget does not apply
            # A failed load comes back with the rows, and the command says it once: not also the
            # engine's own log line, which Ray would forward to the command's terminal first.
            log_load_failures=False,
        )
        self.options = settings.generation_defaults()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vision-ray-engine", daemon=True).start()
        self.engine = Engine(captioner, config)
        self._wait(self.engine.start())
        # The size the rows' pixels were decoded at: the driver's (ray._pixel_spec), read from
        # the model's files before any load. Read here before the load starts, not after: a model
        # whose backend is picked as it loads answers another size once loaded, and a load that
        # finished first would make every row's pixels fail to reshape.
        spec = self.engine.pixel_spec
        self.shape = (spec.height, spec.width, 3)
        # The model loads from the start, in the background: the first row to caption waits
        # for it, while batches whose rows are all done already (a rerun of Parquet files or
        # shards, which only the workers plan) pass through without waiting for a load.
        self.loaded = asyncio.run_coroutine_threadsafe(self.engine.load(), self.loop)

    def _wait(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.unbuilt:
            results = [self._unbuilt_row(row) for row in batch_rows(batch)]
        else:
            results = self._wait(self._caption(batch))
        out = {name: batch[name] for name in batch if name not in ("pixels", "error", "width", "height")}
        out["error"] = np.array([error for _, error, _ in results], dtype=object)
        out["captions"] = np.array(
            [json.dumps(texts, ensure_ascii=False) for texts, _, _ in results], dtype=object
        )
        out["unloaded"] = np.array([cause for _, _, cause in results], dtype=object)
        return out

    def _unbuilt_row(self, row: dict[str, Any]) -> tuple[dict[str, str], str, str]:
        """A row of an actor without a model: one that failed to decode is said as failed, one
        to caption is left uncaptioned with the reason (the driver stops the run)."""
        error = str(row["error"])
        return {}, error, "" if error or not row_tasks(row) else self.unbuilt

    async def _caption(self, batch: dict[str, Any]) -> list[tuple[dict[str, str], str, str]]:
        """Per row: the captions, what failed, and why the model did not load (the row is left
        uncaptioned; the driver stops the run and says it once)."""
        return await asyncio.gather(*(self._caption_row(row) for row in batch_rows(batch)))

    async def _caption_row(self, row: dict[str, Any]) -> tuple[dict[str, str], str, str]:
        from vision_server.bulk.pipeline import caption_image

        tasks, error = row_tasks(row), str(row["error"])
        if error or not tasks:
            return {}, error, ""
        try:
            await asyncio.wrap_future(self.loaded)
        except VisionServerError as exc:
            return {}, "", self.engine.status().last_error or exc.message
        pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(self.shape)
        image = PreparedImage(pixels, (int(row["width"]), int(row["height"])))
        texts, problem = await caption_image(
            self.engine, image, tasks, self.options, request_id=row_record(row).display
        )
        return texts, problem or "", ""
