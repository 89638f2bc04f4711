"""Priority lanes over HTTP: the priority field and X-Priority header, defaults, per-lane 503s."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, FormData

from tests.support.gated import GatedFake
from tests.support.images import b64, image_bytes
from tests.support.serving import running_app
from vision_server.api.state import ENGINE
from vision_server.engine.scheduler import Engine
from vision_server.settings import Settings


async def until(engine: Engine, lanes: dict[str, int]) -> None:
    for _ in range(500):
        if engine.status().lane_depths == lanes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"lanes are {engine.status().lane_depths}, expected {lanes}")


def one_file(seed: int, **fields: str) -> FormData:
    form = FormData()
    form.add_field("images", image_bytes(seed), filename=f"{seed}.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_lanes_over_http(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_queue=2, max_batch_size=1)
    fake = GatedFake()
    async with running_app(settings, fake) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]

        def native(seed: int, headers: dict[str, str] | None = None, **extra: Any) -> asyncio.Task[Any]:
            body = {"image": b64(seed), "prompt": "<CAPTION>", **extra}
            return asyncio.create_task(session.post("/process_image", json=body, headers=headers))

        accepted = [native(0)]
        assert await asyncio.to_thread(fake.entered.wait, 10)  # it runs; the rest must queue
        accepted += [native(1, {"X-Priority": "bulk"}), native(2, priority="BULK")]
        await until(engine, {"interactive": 0, "bulk": 2})

        async with session.post(
            "/process_image", json={"image": b64(3), "prompt": "<CAPTION>"}, headers={"X-Priority": "bulk"}
        ) as full:
            assert full.status == 503 and "bulk queue is full" in (await full.json())["detail"]
            assert int(full.headers["Retry-After"]) >= 1
        async with session.post("/batch_caption", data=one_file(4)) as batch:  # bulk by default
            assert batch.status == 503, await batch.text()
        chat = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": f"data:image/png;base64,{b64(5)}"}],
                }
            ],
            "priority": "bulk",
        }
        async with session.post("/v1/chat/completions", json=chat) as openai_full:
            assert openai_full.status == 503

        # The bulk lane is full, yet interactive requests queue: single images by default,
        # and a /batch_caption that asks for the interactive lane.
        accepted += [
            native(6),
            asyncio.create_task(session.post("/batch_caption", data=one_file(7, priority="interactive"))),
        ]
        await until(engine, {"interactive": 2, "bulk": 2})
        async with session.get("/v1/status") as status:
            assert (await status.json())["lane_depths"] == {"interactive": 2, "bulk": 2}
        async with session.get("/metrics") as metrics:
            text = await metrics.text()
        assert 'vision_server_lane_queue_depth{lane="bulk"} 2.0' in text
        assert 'vision_server_lane_queue_depth{lane="interactive"} 2.0' in text

        for bad in ({"X-Priority": "urgent"},):
            async with session.post(
                "/process_image", json={"image": b64(8), "prompt": "<CAPTION>"}, headers=bad
            ) as refused:
                assert refused.status == 400 and "'interactive' or 'bulk'" in (await refused.json())["detail"]
        async with session.post(
            "/process_image", json={"image": b64(8), "prompt": "<CAPTION>", "priority": 3}
        ) as refused:
            assert refused.status == 400 and "'priority' must be a string" in (await refused.json())["detail"]

        fake.gate.set()
        for task in accepted:
            async with await task as response:
                assert response.status == 200, await response.text()
