"""Helpers shared by the compatibility-API tests (OpenAI, Extras, multipart)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession
from PIL import Image

from vision_server.settings import Settings


def tiny_settings(factory: pytest.TempPathFactory, **overrides: Any) -> Settings:
    """The real tiny model, built once per test session into one cache dir all these modules share."""
    cache = factory.getbasetemp() / "compat-model-cache"
    cache.mkdir(exist_ok=True)
    return Settings(model="test:tiny", cache_dir=cache, idle_timeout=-1, **overrides)


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def b64(seed: int, fmt: str = "PNG") -> str:
    return base64.b64encode(image_bytes(seed, fmt)).decode()


def data_url(seed: int, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{b64(seed, fmt)}"


async def native_caption(session: ClientSession, seed: int, task: str) -> str:
    """The reference answer: the native /process_image caption for the same image and task."""
    async with session.post("/process_image", json={"image": b64(seed), "prompt": task}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["result"])


async def engine_status(session: ClientSession) -> dict[str, Any]:
    async with session.get("/v1/status") as response:
        return dict(await response.json())
