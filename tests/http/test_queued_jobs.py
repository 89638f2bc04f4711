"""What a queued job costs and how long it stays: only model-sized pixels, and only while wanted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from aiohttp import ClientSession

from tests.support.images import encode, flat, to_b64
from tests.support.serving import running_app
from vision_server.api.state import ENGINE
from vision_server.images import PreparedImage
from vision_server.settings import Settings
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


async def test_a_queued_job_keeps_model_sized_pixels_not_the_decoded_upload(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1)
    fake = FakeCaptioner(delay=1.0)
    async with running_app(settings, fake) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        small, big = (
            to_b64(encode(flat((8, 8), (10, 120, 200)))),
            to_b64(encode(flat((3000, 2000), (10, 120, 200)))),
        )
        first = asyncio.create_task(
            session.post("/process_image", json={"image": small, "prompt": "<CAPTION>"})
        )
        while not engine.status().jobs_running:  # the worker is busy: the next job has to wait
            await asyncio.sleep(0.01)
        second = asyncio.create_task(
            session.post("/process_image", json={"image": big, "prompt": "<CAPTION>"})
        )
        while not engine.status().queue_depth:
            await asyncio.sleep(0.01)
        (queued,) = list(engine._slots[engine.default_model].queue)
        image = queued.item.image
        assert isinstance(image, PreparedImage) and image.original_size == (3000, 2000)
        assert image.pixels.dtype == np.uint8 and image.pixels.shape == (FAKE_SPEC.height, FAKE_SPEC.width, 3)
        for task in (first, second):
            async with await task as response:
                assert response.status == 200, await response.text()
