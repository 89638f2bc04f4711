"""Settings for the real tiny model and the small HTTP calls the API tests share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.images import b64
from vision_server.settings import Settings


def tiny_cache_dir(factory: pytest.TempPathFactory) -> Path:
    """The one cache dir of this test run where ``test:tiny`` is built (once), in-process or not."""
    cache = factory.getbasetemp() / "tiny-model-cache"
    cache.mkdir(exist_ok=True)
    return cache


def tiny_settings(factory: pytest.TempPathFactory, **overrides: Any) -> Settings:
    """Settings serving the real tiny model from the run's shared cache, never idling out."""
    return Settings(model=("test:tiny",), cache_dir=tiny_cache_dir(factory), idle_timeout=-1, **overrides)


async def native_caption(session: ClientSession, seed: int, task: str) -> str:
    """The reference answer: the native /process_image caption for the same image and task."""
    async with session.post("/process_image", json={"image": b64(seed), "prompt": task}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["result"])


async def engine_status(session: ClientSession) -> dict[str, Any]:
    async with session.get("/v1/status") as response:
        return dict(await response.json())


def json_documents(text: str) -> list[Any]:
    """The JSON values printed one after another (curl adds no newline between replies)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while (index := len(text) - len(text[index:].lstrip())) < len(text):
        value, index = decoder.raw_decode(text, index)
        values.append(value)
    return values
