"""The warm tier with the real tiny Florence-2 on the CPU; a fake mover stands in for CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import StartEngine
from tests.support.clock import FakeClock
from tests.support.images import noise
from tests.unit.test_engine import parked, wait_for_state
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.engine.lifecycle import ModelState
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.images import fit_image


class FakeMover:
    """Pretends the model runs on a GPU: "host memory" is a fresh copy of every tensor."""

    def __init__(self) -> None:
        self.moves: list[str] = []

    def helps(self, device: torch.device) -> bool:
        return True

    def to_host(self, model: Any) -> None:
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
        self.moves.append("host")

    def to_device(self, model: Any, device: torch.device) -> None:
        self.moves.append(f"device {device}")


def caption_item(captioner: FlorenceCaptioner, seed: int) -> CaptionItem:
    return CaptionItem(
        fit_image(noise(seed), captioner.pixel_spec), "<CAPTION>", GenerationOptions(max_new_tokens=32)
    )


async def test_idle_tiny_model_goes_to_the_tier_wakes_with_the_same_captions_then_is_freed(
    start_engine: StartEngine, tiny_native_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mover = FakeMover()
    captioner = FlorenceCaptioner(str(tiny_native_dir), cache_dir=tmp_path, device="cpu", mover=mover)
    clock = FakeClock()
    engine = await start_engine(captioner, clock=clock, idle_timeout=60, offload_timeout=600)
    before = (await engine.submit(caption_item(captioner, 1))).text
    await parked(clock)
    await clock.advance(60)
    await wait_for_state(engine, ModelState.OFFLOADED, 30)
    assert mover.moves == ["host"] and captioner.is_loaded
    caplog.set_level("INFO", logger="vision_server.engine.scheduler")
    after = (await engine.submit(caption_item(captioner, 1))).text
    assert after == before and mover.moves == ["host", "device cpu"]
    assert "woke from host memory" in caplog.text and engine.state is ModelState.READY
    await parked(clock)
    await clock.advance(60)
    await wait_for_state(engine, ModelState.OFFLOADED, 30)
    await parked(clock)
    await clock.advance(600)
    await wait_for_state(engine, ModelState.UNLOADED, 30)
    assert not captioner.is_loaded


async def test_on_the_cpu_the_tier_is_skipped(
    start_engine: StartEngine, tiny_native_dir: Path, tmp_path: Path
) -> None:
    captioner = FlorenceCaptioner(str(tiny_native_dir), cache_dir=tmp_path, device="cpu")
    clock = FakeClock()
    engine = await start_engine(captioner, clock=clock, idle_timeout=60, offload_timeout=600)
    await engine.submit(caption_item(captioner, 2))
    assert not captioner.can_offload
    await parked(clock)
    await clock.advance(60)
    await wait_for_state(engine, ModelState.UNLOADED, 30)
