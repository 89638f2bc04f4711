"""The warm tier's state machine in the engine: ready → offloaded → unloaded, and waking up."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import StartEngine
from tests.support.clock import FakeClock
from tests.unit.test_engine import parked, wait_for_state
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.engine.lifecycle import ModelState
from vision_server.errors import BadRequest
from vision_server.images import fit_image
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


def item(shade: int = 0) -> CaptionItem:
    image = fit_image(Image.new("RGB", (8, 8), (shade,) * 3), FAKE_SPEC)
    return CaptionItem(image, "<CAPTION>", GenerationOptions())


async def test_idle_model_moves_to_host_memory_then_is_freed(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner(offloadable=True)
    engine = await start_engine(fake, clock=clock, idle_timeout=300, offload_timeout=1800)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(300)
    await wait_for_state(engine, ModelState.OFFLOADED, 10)
    assert (fake.offloads, fake.unloads) == (1, 0)
    expires = engine.status().expires_at
    assert expires is not None  # when the host copy is freed
    await parked(clock)
    await clock.advance(1799)
    assert engine.state is ModelState.OFFLOADED
    await clock.advance(1)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert (fake.offloads, fake.unloads, fake.wakes, fake.loads) == (1, 1, 0, 1)


async def test_a_job_wakes_an_offloaded_model_instead_of_loading_it(
    start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    clock, fake = FakeClock(), FakeCaptioner(offloadable=True)
    engine = await start_engine(fake, clock=clock, idle_timeout=300, offload_timeout=1800)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(300)
    await wait_for_state(engine, ModelState.OFFLOADED, 10)
    caplog.set_level("INFO", logger="vision_server.engine.scheduler")
    assert (await engine.submit(item(1))).text == FakeCaptioner.expected(item(1))
    assert (fake.loads, fake.wakes, engine.state) == (1, 1, ModelState.READY)
    assert "woke from host memory in" in caplog.text
    await parked(clock)
    await clock.advance(299)  # the idle clock starts again from the batch after the wake
    assert engine.state is ModelState.READY
    await clock.advance(1)
    await wait_for_state(engine, ModelState.OFFLOADED, 10)
    assert len(fake.threads) == 1  # offload and wake run in the model thread


@pytest.mark.parametrize(("offloadable", "offload_timeout"), [(False, 1800), (True, 0)])
async def test_the_tier_is_skipped_on_cpu_or_when_turned_off(
    start_engine: StartEngine, offloadable: bool, offload_timeout: float
) -> None:
    clock, fake = FakeClock(), FakeCaptioner(offloadable=offloadable)
    engine = await start_engine(fake, clock=clock, idle_timeout=300, offload_timeout=offload_timeout)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(300)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert fake.offloads == 0 and fake.unloads == 1
    await engine.load()
    with pytest.raises(BadRequest, match="no warm tier"):
        await engine.offload()


async def test_admin_offload_and_unload_from_the_tier(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(offloadable=True)
    engine = await start_engine(fake, idle_timeout=-1)
    assert (await engine.offload()).state is ModelState.UNLOADED  # nothing loaded: nothing to do
    await engine.load()
    assert (await engine.offload()).state is ModelState.OFFLOADED
    assert (await engine.offload()).state is ModelState.OFFLOADED and fake.offloads == 1
    assert (await engine.unload()).state is ModelState.UNLOADED
    assert fake.unloads == 1 and not fake.loaded


async def test_a_failed_offload_frees_the_model(start_engine: StartEngine) -> None:
    class Failing(FakeCaptioner):
        def offload(self) -> None:
            raise RuntimeError("pinning failed")

    clock, fake = FakeClock(), Failing(offloadable=True)
    engine = await start_engine(fake, clock=clock, idle_timeout=5)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(5)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert fake.unloads == 1 and (await engine.submit(item(2))).text
