"""Per-request keep-alive (Ollama's semantics): parsing, the cap, and when the engine unloads."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from tests.conftest import StartEngine
from tests.support.clock import FakeClock, settle
from tests.support.gated import GatedFake
from tests.unit.test_engine import parked, wait_for_state
from vision_server.api.errors import InvalidParameter
from vision_server.api.keep_alive import parse_keep_alive
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.engine.jobs import JobLabels
from vision_server.engine.lifecycle import ModelState
from vision_server.errors import BadRequest
from vision_server.images import fit_image
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


def item(shade: int = 0) -> CaptionItem:
    return CaptionItem(
        fit_image(Image.new("RGB", (8, 8), (shade,) * 3), FAKE_SPEC), "<CAPTION>", GenerationOptions()
    )


def keep(seconds: float | None) -> JobLabels:
    return JobLabels(keep_alive=seconds)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (0, 0.0),
        (-1, -1.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("-1", -1.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("-1m", -60.0),
        (" 5m ", 300.0),
        (None, None),
        ("", None),
    ],
)
def test_keep_alive_values(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value, cap=-1) == seconds
    assert parse_keep_alive(value, cap=300) == seconds  # the cap is the engine's to apply


@pytest.mark.parametrize(
    "value", ["soon", "10 minutes", "5d", "m", "1h-5m", "nan", "inf", True, [5], {"s": 1}]
)
def test_invalid_keep_alive_is_a_400_that_shows_the_forms(value: object) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_keep_alive(value, cap=-1)
    assert info.value.status == 400 and "'10m'" in info.value.message and "'-1'" in info.value.message


def test_under_a_cap_the_forms_shown_leave_out_forever() -> None:
    """A capped server refuses -1, so its 400 for a malformed value must not suggest it."""
    with pytest.raises(InvalidParameter) as info:
        parse_keep_alive("soon", cap=300)
    message = info.value.message
    assert "'10m'" in message and "-1" not in message and "300 s" in message and "--max-keep-alive" in message


async def test_the_cap_defaults_to_the_idle_timeout_and_refuses_forever(start_engine: StartEngine) -> None:
    engine = await start_engine(FakeCaptioner(), idle_timeout=300)
    assert engine.grant_keep_alive(60) == 60 and engine.grant_keep_alive(0) == 0
    assert engine.grant_keep_alive(7200) == 300  # above the cap: the cap
    with pytest.raises(BadRequest, match="caps keep-alive at 300 s"):
        engine.grant_keep_alive(-1)
    uncapped = await start_engine(FakeCaptioner(), idle_timeout=300, max_keep_alive=-1)
    assert uncapped.grant_keep_alive(-1) == -1 and uncapped.grant_keep_alive(1e6) == 1e6


async def test_positive_keep_alive_sets_the_unload_time(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=300, max_keep_alive=3600)
    await engine.submit(item(), labels=keep(1800))
    status = engine.status()
    assert (status.keep_alive, status.keep_alive_from) == (1800, "request")
    await parked(clock)
    await clock.advance(1000)  # past the idle timeout, within the request's keep-alive
    assert engine.state is ModelState.READY
    await engine.submit(item(1))  # no keep_alive: the request's 1800 s still holds
    await parked(clock)
    await clock.advance(1799)
    assert engine.state is ModelState.READY
    await clock.advance(1)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert engine.status().keep_alive_from == "server"  # the next load starts from --idle-timeout


async def test_zero_unloads_after_the_batch_unless_work_is_queued(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), GatedFake()  # the first batch runs until the second job is queued
    engine = await start_engine(fake, clock=clock, idle_timeout=300, max_batch_size=1, max_batch_wait=0)
    first = asyncio.create_task(engine.submit(item(), labels=keep(0)))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    second = asyncio.create_task(engine.submit(item(1)))  # queued behind it: no unload between
    await settle()
    assert engine.status().queue_depth == 1
    fake.gate.set()
    await asyncio.gather(first, second)
    await wait_for_state(engine, ModelState.UNLOADED, 10)  # the clock never moved
    assert fake.loads == 1 and fake.unloads == 1 and fake.batch_sizes == [1, 1]


async def test_negative_keeps_the_model_until_another_request_says_otherwise(
    start_engine: StartEngine,
) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=300, max_keep_alive=-1)
    await engine.submit(item(), labels=keep(-1))
    assert engine.status().expires_at is None and engine.status().keep_alive == -1
    await clock.advance(1e6)
    await engine.submit(item(1))  # no keep_alive: says nothing otherwise
    await clock.advance(1e6)
    assert engine.state is ModelState.READY and fake.unloads == 0
    await engine.submit(item(2), labels=keep(10))
    await parked(clock)
    await clock.advance(10)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
