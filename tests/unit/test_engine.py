"""The engine in-process, with a fake captioner where timing must be controlled."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from tests.conftest import StartEngine
from tests.support.clock import FakeClock, settle
from tests.support.gated import GatedFake
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.engine.jobs import CaptionJob
from vision_server.engine.lifecycle import ModelCard, ModelState
from vision_server.engine.queue import JobQueue
from vision_server.engine.scheduler import Engine
from vision_server.errors import (
    BadRequest,
    CaptionFailed,
    DeadlineExceeded,
    Draining,
    ModelLoadError,
    OutOfMemory,
    QueueFull,
)
from vision_server.images import fit_image
from vision_server.tasks import PROMPTGEN_TASKS
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


def item(shade: int = 0, task: str = "<CAPTION>", options: GenerationOptions | None = None) -> CaptionItem:
    image = fit_image(Image.new("RGB", (8, 8), (shade, shade, shade)), FAKE_SPEC)
    return CaptionItem(image, task, options or GenerationOptions())


async def wait_for_state(engine: Engine, state: ModelState, timeout: float) -> float:
    """Seconds until ``engine`` reaches ``state`` (fails the test after ``timeout``)."""
    start = time.monotonic()
    while engine.state is not state:
        assert time.monotonic() - start < timeout, f"still {engine.state} after {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def parked(clock: FakeClock, timeout: float = 10) -> None:
    """Wait until the worker sleeps on ``clock`` (its idle wait), so that an advance reaches it."""
    end = time.monotonic() + timeout
    while clock.sleepers == 0:
        assert time.monotonic() < end, "the worker never waited on the clock"
        await asyncio.sleep(0.005)


# --- queue and batching ---------------------------------------------------------------------------


def _job(options: GenerationOptions) -> CaptionJob:
    return CaptionJob(item(options=options), asyncio.get_event_loop().create_future())


async def test_take_batch_groups_compatible_jobs_and_keeps_fifo() -> None:
    greedy, beams = GenerationOptions(num_beams=1), GenerationOptions(num_beams=3)
    queue = JobQueue(10)
    jobs = [_job(o) for o in (greedy, beams, greedy, beams, greedy)]
    for job in jobs:
        queue.put(job, retry_after=1)
    assert queue.take_batch(limit=2) == [jobs[0], jobs[2]]
    assert queue.take_batch(limit=8) == [jobs[1], jobs[3]]  # the oldest left leads the next batch
    assert queue.take_batch(limit=8) == [jobs[4]]


async def test_queue_full_raises_with_retry_after() -> None:
    queue = JobQueue(1)
    queue.put(_job(GenerationOptions()), retry_after=7)
    with pytest.raises(QueueFull) as info:
        queue.put(_job(GenerationOptions()), retry_after=7)
    assert info.value.retry_after == 7 and info.value.status == 503


async def test_waiting_jobs_batch_together_and_results_match(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(delay=0.2)
    engine = await start_engine(fake, max_batch_size=16)
    items = [item(shade, task) for shade, task in zip(range(10), ["<CAPTION>", "<ANALYZE>"] * 5, strict=True)]
    results = await asyncio.gather(*(engine.submit(i) for i in items))
    assert [r.text for r in results] == [FakeCaptioner.expected(i) for i in items]
    assert max(fake.batch_sizes) > 1 and sum(fake.batch_sizes) == 10


async def test_incompatible_options_never_share_a_batch(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(delay=0.05)
    engine = await start_engine(fake)
    options = [GenerationOptions(num_beams=1 + (n % 2)) for n in range(8)]
    await asyncio.gather(*(engine.submit(item(n, options=o)) for n, o in enumerate(options)))
    assert sum(fake.batch_sizes) == 8 and max(fake.batch_sizes) <= 4


async def test_model_runs_in_one_dedicated_thread(start_engine: StartEngine) -> None:
    fake = FakeCaptioner()
    engine = await start_engine(fake, idle_timeout=0)
    for n in range(3):
        await engine.submit(item(n))
    await wait_for_state(engine, ModelState.UNLOADED, 2)
    assert len(fake.threads) == 1 and threading.current_thread().name not in fake.threads


# --- lifecycle ------------------------------------------------------------------------------------


async def test_lazy_load_on_first_job(start_engine: StartEngine) -> None:
    fake = FakeCaptioner()
    engine = await start_engine(fake)
    assert engine.status().state is ModelState.UNLOADED and fake.loads == 0
    await engine.submit(item())
    status = engine.status()
    assert status.state is ModelState.READY and status.device == "cpu" and status.loaded_since
    assert status.expires_at is not None and status.expires_at > time.time()


async def test_model_card_names_the_model_and_shows_where_it_runs_once_loaded(
    start_engine: StartEngine,
) -> None:
    engine = await start_engine(FakeCaptioner(model_id="card-model"), idle_timeout=-1)
    named: dict[str, Any] = {"name": "card-model", "source": "card-model"}
    assert engine.model_card == ModelCard("card-model", PROMPTGEN_TASKS, None, None, **named)
    await engine.load()
    assert engine.model_card == ModelCard("card-model", PROMPTGEN_TASKS, "cpu", "float32", **named)
    await engine.unload()
    assert engine.model_card.device is None
    assert not hasattr(engine, "captioner"), "the worker is the only holder of the model"


async def test_idle_unload_counts_from_the_end_of_the_last_batch(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), GatedFake()
    engine = await start_engine(fake, clock=clock, idle_timeout=300)
    job = asyncio.create_task(engine.submit(item()))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    await clock.advance(100)  # the batch takes 100 s
    fake.gate.set()
    await job
    await parked(clock)
    await clock.advance(299)  # 399 s after the batch began, 299 s after it ended
    assert engine.state is ModelState.READY and fake.unloads == 0
    await clock.advance(1)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert fake.unloads == 1


async def test_long_request_is_never_unloaded_midway(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), GatedFake()
    engine = await start_engine(fake, clock=clock, idle_timeout=1.0)
    job = asyncio.create_task(engine.submit(item()))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    await clock.advance(500)  # far past the idle timeout while the batch runs
    fake.gate.set()
    assert (await job).text and fake.unloads == 0  # the fake asserts it is loaded inside caption()
    assert engine.state is ModelState.READY


async def test_new_request_during_idle_wait_resets_the_clock(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=300)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(200)
    await engine.submit(item(1))
    await parked(clock)
    await clock.advance(200)  # 400 s after the first job: it would have unloaded without the reset
    assert engine.state is ModelState.READY and fake.unloads == 0
    await clock.advance(100)  # 300 s after the second
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    assert fake.loads == 1 and fake.unloads == 1


async def test_idle_timeout_minus_one_never_unloads(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=-1)
    await engine.submit(item())
    await clock.advance(1e6)
    assert engine.state is ModelState.READY and engine.status().expires_at is None
    assert clock.sleepers == 0  # the idle worker waits for a job, with no timer at all


async def test_idle_timeout_zero_unloads_when_the_queue_drains(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=0)
    await engine.submit(item())
    await wait_for_state(engine, ModelState.UNLOADED, 10)  # the clock never moved: due at once
    assert fake.unloads == 1


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait (real time) for work the model thread does, e.g. a trim the clock made due."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the condition never held"
        await asyncio.sleep(0.005)


async def test_memory_is_trimmed_once_after_a_burst_in_the_model_thread(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=-1, trim_after=1.0, max_batch_wait=0)
    await asyncio.gather(*(engine.submit(item(shade)) for shade in range(6)))
    await parked(clock)
    await clock.advance(0.9)
    assert fake.trims == 0, "the queue has not been empty for trim_after yet"
    await clock.advance(0.1)
    await eventually(lambda: fake.trims == 1)
    assert len(fake.threads) == 1 and threading.current_thread().name not in fake.threads
    await eventually(lambda: clock.sleepers == 0)  # nothing more is due: no timer at all
    await clock.advance(1e6)
    assert fake.trims == 1 and engine.state is ModelState.READY
    await engine.submit(item(9))  # the next burst is trimmed in its turn
    await parked(clock)
    await clock.advance(1.0)
    await eventually(lambda: fake.trims == 2)


async def test_no_trim_between_requests_that_follow_each_other_closely(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=-1, trim_after=1.0)
    for shade in range(8):  # one client, a request every half second
        await engine.submit(item(shade))
        await parked(clock)
        await clock.advance(0.5)
    assert fake.trims == 0
    await clock.advance(0.5)
    await eventually(lambda: fake.trims == 1)


async def test_an_idle_unload_due_first_replaces_the_trim(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, idle_timeout=0.5, trim_after=1.0)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(0.5)
    await wait_for_state(engine, ModelState.UNLOADED, 10)
    await clock.advance(10)
    assert fake.unloads == 1 and fake.trims == 0  # unloading returned the memory already


async def test_a_failing_trim_is_logged_and_captioning_goes_on(
    start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenTrim(FakeCaptioner):
        def trim_memory(self) -> None:
            raise OSError("no allocator here")

    clock = FakeClock()
    engine = await start_engine(BrokenTrim(), clock=clock, idle_timeout=-1, trim_after=1.0)
    await engine.submit(item())
    await parked(clock)
    await clock.advance(1.0)
    await eventually(lambda: "trimming freed memory failed" in caplog.text)
    assert (await engine.submit(item(1))).text and engine.running


async def test_load_failure_fails_jobs_then_recovers(start_engine: StartEngine) -> None:
    fake = FakeCaptioner()
    fake.fail_load = "weights missing in /models/x"
    engine = await start_engine(fake)
    with pytest.raises(ModelLoadError, match="weights missing"):
        await engine.submit(item())
    status = engine.status()
    assert status.state is ModelState.FAILED and "weights missing" in (status.last_error or "")
    fake.fail_load = None
    assert (await engine.submit(item())).text
    assert engine.status().state is ModelState.READY and engine.status().last_error is None


async def test_lifecycle_lines_carry_the_model_as_a_log_key(
    start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """With several models, JSON logs are searched by model: a load, its failure and an unload
    each say which model as a key, not only in the words of the message."""
    caplog.set_level(logging.INFO, logger="vision_server.engine.scheduler")
    fake = FakeCaptioner(model_id="lines-model")
    fake.fail_load = "no weights"
    engine = await start_engine(fake, idle_timeout=-1)
    with pytest.raises(ModelLoadError):
        await engine.submit(item())
    fake.fail_load = None
    await engine.load()
    await engine.unload()
    lines = [
        (re.sub(r"in [\d.]+ s", "in N s", r.getMessage().split(":")[0]), getattr(r, "model", None))
        for r in caplog.records
    ]
    assert lines == [
        ("model lines-model failed to load", "lines-model"),
        ("model lines-model loaded on cpu (float32) in N s", "lines-model"),
        ("model unloaded (admin) in N s", "lines-model"),
    ], lines


async def test_caption_exception_fails_the_batch_and_worker_survives(start_engine: StartEngine) -> None:
    fake = FakeCaptioner()
    fake.fail_caption = RuntimeError("boom")
    engine = await start_engine(fake)
    with pytest.raises(CaptionFailed):
        await engine.submit(item())
    fake.fail_caption = None
    assert (await engine.submit(item())).text


async def test_out_of_memory_splits_the_batch(start_engine: StartEngine) -> None:
    class HalvingFake(FakeCaptioner):
        def caption(self, batch: list[CaptionItem]) -> list[Caption]:
            if len(batch) > 2:
                self.batch_sizes.append(-len(batch))
                raise OutOfMemory("oom")
            return super().caption(batch)

    fake = HalvingFake(delay=0.05)
    engine = await start_engine(fake, max_batch_wait=0.05)
    items = [item(n) for n in range(8)]
    results = await asyncio.gather(*(engine.submit(i) for i in items))
    assert [r.text for r in results] == [FakeCaptioner.expected(i) for i in items]
    assert any(size < 0 for size in fake.batch_sizes)


async def test_a_refused_request_fails_alone_and_its_batch_mates_are_captioned(
    start_engine: StartEngine,
) -> None:
    """A 4xx that only one request causes (say a prompt too long for the model) is found by halving
    the batch: that request gets it, the others in its batch still get their captions."""

    class PickyFake(FakeCaptioner):
        def caption(self, batch: list[CaptionItem]) -> list[Caption]:
            self.batch_sizes.append(len(batch))
            if any(int(entry.image.pixels[0, 0, 0]) == 66 for entry in batch):
                raise BadRequest("shade 66 is refused")
            return super().caption(batch)

    fake = PickyFake(delay=0.05)
    engine = await start_engine(fake, max_batch_wait=0.1)
    items = [item(n) for n in (10, 20, 66, 30)]
    results = await asyncio.gather(*(engine.submit(i) for i in items), return_exceptions=True)
    assert isinstance(results[2], BadRequest) and "shade 66" in str(results[2])
    kept = [results[n] for n in (0, 1, 3)]
    assert [r.text for r in kept] == [FakeCaptioner.expected(items[n]) for n in (0, 1, 3)]  # type: ignore[union-attr]
    assert max(fake.batch_sizes) > 1  # they were batched together, then split


async def test_an_image_out_of_memory_alone_fails_alone(start_engine: StartEngine) -> None:
    class OneTooBig(FakeCaptioner):
        def caption(self, batch: list[CaptionItem]) -> list[Caption]:
            self.batch_sizes.append(len(batch))
            if any(int(entry.image.pixels[0, 0, 0]) == 99 for entry in batch):
                raise OutOfMemory("oom", retry_after=5)
            return super().caption(batch)

    fake = OneTooBig(delay=0.05)
    engine = await start_engine(fake, max_batch_wait=0.1)
    items = [item(n) for n in (1, 99, 2)]
    results = await asyncio.gather(*(engine.submit(i) for i in items), return_exceptions=True)
    assert isinstance(results[1], OutOfMemory)
    first, third = results[0], results[2]
    assert isinstance(first, Caption) and isinstance(third, Caption), results
    assert [first.text, third.text] == [
        FakeCaptioner.expected(items[0]),
        FakeCaptioner.expected(items[2]),
    ]
    assert max(fake.batch_sizes) > 1
    assert (await engine.submit(item(3))).text  # the worker goes on


# --- backpressure, deadlines, cancellation, admin, shutdown ---------------------------------------


async def test_queue_full_is_refused_with_an_estimate(start_engine: StartEngine) -> None:
    fake = GatedFake()
    engine = await start_engine(fake, max_queue=2, max_batch_size=1)
    tasks = [asyncio.create_task(engine.submit(item(0)))]
    assert await asyncio.to_thread(fake.entered.wait, 10)  # the first is running
    tasks += [asyncio.create_task(engine.submit(item(n))) for n in (1, 2)]
    await settle()
    assert engine.status().queue_depth == 2  # two queued: the queue is full
    with pytest.raises(QueueFull) as info:
        await engine.submit(item(9))
    assert 1 <= (info.value.retry_after or 0) <= 120
    fake.gate.set()
    await asyncio.gather(*tasks)


async def test_wait_for_room_is_never_refused_and_keeps_the_queue_bound(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(delay=0.02)
    engine = await start_engine(fake, max_queue=2, max_batch_size=2, max_batch_wait=0)
    items = [item(n) for n in range(20)]
    depths: list[int] = []

    async def watch() -> None:
        while True:
            depths.append(engine.status().queue_depth)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(engine.submit(i, wait_for_room=True) for i in items))
    watcher.cancel()
    assert [r.text for r in results] == [FakeCaptioner.expected(i) for i in items]
    assert max(depths) <= 2 and max(fake.batch_sizes) <= 2


async def test_waiting_for_room_ends_with_draining_on_stop(start_engine: StartEngine) -> None:
    # The first job holds the worker until the stop has refused the other two (with fixed sleeps
    # a slow start could find the queue of one still full of the first: QueueFull, not Draining).
    fake = GatedFake()
    engine = await start_engine(fake, max_queue=1, max_batch_size=1)
    running = asyncio.create_task(engine.submit(item(0)))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    queued = asyncio.create_task(engine.submit(item(1)))
    await settle()
    assert engine.status().queue_depth == 1
    waiting = asyncio.create_task(engine.submit(item(2), wait_for_room=True))
    await settle()
    assert not waiting.done()
    stopping = asyncio.create_task(engine.stop(grace=0))
    for task in (queued, waiting):
        with pytest.raises(Draining):
            await asyncio.wait_for(task, 10)  # at once, while the first job still runs
    fake.gate.set()
    await stopping
    assert (await running).text


async def test_abandoned_job_is_never_run(start_engine: StartEngine) -> None:
    fake = GatedFake()
    engine = await start_engine(fake, max_batch_size=1)
    first = asyncio.create_task(engine.submit(item(1)))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    doomed = asyncio.create_task(engine.submit(item(2)))
    await settle()
    assert engine.status().queue_depth == 1
    doomed.cancel()
    await settle()
    assert engine.status().queue_depth == 0  # it left the queue at once
    fake.gate.set()
    await first
    assert fake.batch_sizes == [1] and engine.status().jobs_done == 1


async def test_deadline_gives_timeout_error(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(delay=0.6)
    engine = await start_engine(fake, request_timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await engine.submit(item())


async def test_admin_load_and_unload_are_worker_messages(start_engine: StartEngine) -> None:
    fake = FakeCaptioner()
    engine = await start_engine(fake)
    assert (await engine.load()).state is ModelState.READY
    assert (await engine.unload()).state is ModelState.UNLOADED
    assert fake.loads == 1 and fake.unloads == 1 and len(fake.threads) == 1


async def test_admin_unload_waits_for_the_running_batch(start_engine: StartEngine) -> None:
    fake = GatedFake()
    engine = await start_engine(fake)
    job = asyncio.create_task(engine.submit(item()))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    unload = asyncio.create_task(engine.unload())
    await settle()
    assert not unload.done() and fake.unloads == 0  # the batch runs on
    fake.gate.set()
    await unload
    assert job.done() and job.result().text and fake.unloads == 1  # the batch finished first


async def test_stop_drains_queued_jobs_then_refuses(start_engine: StartEngine) -> None:
    fake = FakeCaptioner(delay=0.2)
    engine = await start_engine(fake, max_batch_size=1)
    jobs = [asyncio.create_task(engine.submit(item(n))) for n in range(3)]
    await asyncio.sleep(0.05)
    await engine.stop(grace=5)
    assert all(job.result().text for job in jobs)
    assert fake.unloads == 1 and not fake.loaded
    with pytest.raises(Draining):
        await engine.submit(item())


async def test_stop_past_grace_fails_the_rest_with_503(start_engine: StartEngine) -> None:
    # The first job holds the worker past the grace (a fixed 0.5 s job could end within it, or
    # not have started, on a slow machine); the two queued behind it are refused at the grace.
    fake = GatedFake()
    engine = await start_engine(fake, max_batch_size=1)
    jobs = [asyncio.create_task(engine.submit(item(n))) for n in range(3)]
    assert await asyncio.to_thread(fake.entered.wait, 10)
    await settle()
    assert engine.status().queue_depth == 2
    stopping = asyncio.create_task(engine.stop(grace=0.1))
    for job in jobs[1:]:
        with pytest.raises(Draining):
            await asyncio.wait_for(job, 10)
    fake.gate.set()
    await stopping
    assert (await jobs[0]).text  # the running one finishes within the stop's margin


async def test_a_lone_job_does_not_wait_for_stragglers(start_engine: StartEngine) -> None:
    clock, fake = FakeClock(), FakeCaptioner()
    engine = await start_engine(fake, clock=clock, max_batch_wait=0.5)
    for n in range(4):  # one client, one image at a time: a straggler wait would never end,
        await asyncio.wait_for(engine.submit(item(n)), 10)  # since this clock only moves by hand
    assert fake.batch_sizes == [1, 1, 1, 1]
    together = asyncio.gather(*(engine.submit(item(n)) for n in range(10, 16)))
    while not together.done():  # several waiting: the worker waits max_batch_wait for more
        await clock.advance(0.5)
        await asyncio.sleep(0.01)
    assert len(await together) == 6 and max(fake.batch_sizes) > 1
