"""One engine serving several named models: routing, loads beside batches, the memory budget,
eviction order, the never-evict-busy rule, fairness and per-model idle timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from PIL import Image

from tests.conftest import StartEngine
from tests.support.clock import FakeClock
from tests.support.gated import SlowToSize
from vision_server.captioner import Caption, CaptionItem, GenerationOptions, ModelInfo
from vision_server.engine.budget import Resident, footprint, plan_evictions
from vision_server.engine.models import NamedModel
from vision_server.engine.scheduler import Engine
from vision_server.errors import ModelTooLarge, UnknownModel
from vision_server.images import fit_image
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner


def item(shade: int = 0, task: str = "<CAPTION>") -> CaptionItem:
    image = fit_image(Image.new("RGB", (8, 8), (shade, shade, shade)), FAKE_SPEC)
    return CaptionItem(image, task, GenerationOptions())


class Journal:
    """The order batches ran in, across every model (one list shared by several fakes)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.lock = threading.Lock()


class LoggingFake(FakeCaptioner):
    """A fake that notes each batch's model in a shared journal. When ``held``, each batch waits
    for a permit (:meth:`release`); ``load_gate`` holds its load until set."""

    def __init__(self, name: str, journal: Journal, *, held: bool = False, **options: Any) -> None:
        super().__init__(model_id=name, **options)
        self.journal = journal
        self.held = held
        self.permits = threading.Semaphore(0)
        self.started = 0  # batches that began
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.load_entered = threading.Event()

    def release(self, batches: int = 1) -> None:
        self.permits.release(batches)

    def load(self) -> ModelInfo:
        self.load_entered.set()
        assert self.load_gate.wait(30), "the test never let the load finish"
        return super().load()

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        with self.journal.lock:
            self.journal.batches.append((self.model_id, len(batch)))
            self.started += 1
        if self.held:
            assert self.permits.acquire(timeout=30), "the test never let the batch finish"
        return super().caption(batch)


def named(*fakes: FakeCaptioner, **idle: float) -> list[NamedModel]:
    return [NamedModel(fake.model_id, fake, idle_timeout=idle.get(fake.model_id)) for fake in fakes]


def states(engine: Engine) -> dict[str, str]:
    return {model.name: model.state.value for model in engine.status().models}


async def until(predicate: Any, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.005)


# --- the eviction rule on its own ----------------------------------------------------------------


def test_a_shared_block_counts_once_and_evicting_a_sharer_frees_only_its_own_part() -> None:
    base_a = Resident("a", {"base": 100, "lora-a": 5})
    base_b = Resident("b", {"base": 100, "lora-b": 5})
    other = Resident("c", {"c": 60})
    assert footprint([base_a.parts, base_b.parts]) == 110
    # d needs 60: a is least recently used but frees only its 5 (b keeps the base): c must go.
    assert plan_evictions({"d": 60}, [base_a, base_b, other], ["a", "c", "b"], budget=180) == ["a", "c"]
    assert plan_evictions({"d": 60}, [base_a, base_b, other], ["c"], budget=180) == ["c"]
    assert plan_evictions({"d": 60}, [base_a, base_b, other], [], budget=180) is None
    # Another adapter on the loaded base costs only its own part.
    assert plan_evictions({"base": 100, "lora-e": 5}, [base_a], [], budget=110) == []


# --- routing -------------------------------------------------------------------------------------


async def test_each_job_reaches_its_own_model_and_a_batch_never_mixes_models(
    start_engine: StartEngine,
) -> None:
    journal = Journal()
    first, second = LoggingFake("first", journal), LoggingFake("second", journal)
    engine = await start_engine(named(first, second), idle_timeout=-1, max_batch_wait=0.05)
    jobs = [engine.submit(item(shade), model=name) for shade in range(6) for name in ("first", "second")]
    results = await asyncio.gather(*jobs, engine.submit(item(9)))
    for index, result in enumerate(results[:-1]):
        shade, model = divmod(index, 2)
        assert result.text == FakeCaptioner.expected(item(shade), ("first", "second")[model])
    assert results[-1].text == FakeCaptioner.expected(item(9), "first")  # no name: the default
    assert sum(size for name, size in journal.batches if name == "first") == 7
    assert sum(size for name, size in journal.batches if name == "second") == 6
    assert first.batch_sizes and second.batch_sizes  # each fake saw only its own batches


async def test_an_unknown_name_is_refused_with_the_served_names(start_engine: StartEngine) -> None:
    engine = await start_engine(
        named(FakeCaptioner(model_id="alpha"), FakeCaptioner(model_id="beta")), default_model="beta"
    )
    assert engine.model_names == ("alpha", "beta") and engine.default_model == "beta"
    with pytest.raises(UnknownModel) as info:
        await engine.submit(item(), model="gamma")
    assert info.value.status == 404
    assert "'gamma'" in info.value.message and "alpha, beta (default beta)" in info.value.message
    assert engine.resolve(None) == engine.resolve("") == "beta"
    assert engine.card("alpha").name == "alpha" and engine.model_card.name == "beta"


# --- loads beside batches --------------------------------------------------------------------------


async def test_a_model_loading_does_not_hold_up_jobs_for_a_ready_one(start_engine: StartEngine) -> None:
    journal = Journal()
    ready, slow = LoggingFake("ready", journal), LoggingFake("slow", journal)
    engine = await start_engine(named(ready, slow), idle_timeout=-1)
    await engine.load("ready")  # loading "ready" itself: nothing else to keep going, model thread
    slow.load_gate.clear()
    waiting = asyncio.create_task(engine.submit(item(1), model="slow"))
    assert await asyncio.to_thread(slow.load_entered.wait, 10)
    # While "slow" is still loading, "ready" answers.
    assert (await asyncio.wait_for(engine.submit(item(2), model="ready"), 10)).text
    assert states(engine)["slow"] == "loading" and not waiting.done()
    slow.load_gate.set()
    assert (await asyncio.wait_for(waiting, 10)).text == FakeCaptioner.expected(item(1), "slow")
    assert slow.threads & {"vision-loader_0"}, "the load ran beside the model thread"
    assert ready.threads == {"vision-model_0"}, "batches stay on the one model thread"


# --- the memory budget -----------------------------------------------------------------------------


async def test_idle_models_are_evicted_least_recently_used_first(start_engine: StartEngine) -> None:
    clock, journal = FakeClock(), Journal()
    fakes = [LoggingFake(name, journal, memory={name: 100}) for name in ("a", "b", "c")]
    engine = await start_engine(named(*fakes), clock=clock, idle_timeout=-1, memory_budget=250)
    await engine.submit(item(), model="a")
    await clock.advance(1)
    await engine.submit(item(), model="b")
    await clock.advance(1)
    await engine.submit(item(), model="a")  # now b is the least recently used
    await clock.advance(1)
    assert states(engine) == {"a": "ready", "b": "ready", "c": "unloaded"}
    await engine.submit(item(), model="c")
    assert states(engine) == {"a": "ready", "b": "unloaded", "c": "ready"}
    status = engine.status()
    assert status.memory_budget == 250 and status.memory_used == 200
    assert [model.memory_bytes for model in status.models] == [100, 100, 100]
    assert fakes[1].unloads == 1 and fakes[0].unloads == 0


async def test_status_answers_before_a_model_knows_its_size_and_never_asks_on_the_event_loop(
    start_engine: StartEngine,
) -> None:
    slow = SlowToSize(model_id="slow", memory={"slow": 64})
    engine = await start_engine(named(slow, FakeCaptioner(model_id="other")), memory_budget=100)
    status = engine.status()  # the first answer is still being worked out in a thread
    assert [model.memory_bytes for model in status.models] == [None, None]
    assert status.as_dict()["models"][0]["memory_bytes"] is None and status.memory_used == 0
    job = asyncio.ensure_future(engine.submit(item(), model="slow"))
    await asyncio.sleep(0.05)
    assert slow.loads == 0 and states(engine)["slow"] == "unloaded", "a load waits for the size"
    slow.sized.set()
    await job
    status = engine.status()
    assert status.models[0].memory_bytes == 64 and status.memory_used == 64
    assert slow.asked_on[0] is not threading.current_thread()  # the slow first answer: in a thread


async def test_an_admin_load_waits_for_the_size_off_the_event_loop(start_engine: StartEngine) -> None:
    slow = SlowToSize(model_id="slow", memory={"slow": 64})
    engine = await start_engine(named(slow), memory_budget=100)
    loading = asyncio.ensure_future(engine.load())
    await asyncio.sleep(0.05)
    assert not loading.done() and slow.loads == 0
    slow.sized.set()
    status = await loading
    assert status.state.value == "ready" and status.memory_used == 64
    assert slow.asked_on[0] is not threading.current_thread()


async def test_a_busy_model_is_never_evicted_and_the_newcomer_waits_for_it(
    start_engine: StartEngine,
) -> None:
    journal = Journal()
    busy = LoggingFake("busy", journal, held=True, memory={"busy": 100})
    idle = LoggingFake("idle", journal, memory={"idle": 100})
    late = LoggingFake("late", journal, memory={"late": 100})
    engine = await start_engine(named(busy, idle, late), idle_timeout=-1, memory_budget=200)
    await engine.load("busy")
    await engine.load("idle")  # "busy" is now the least recently used
    running = asyncio.create_task(engine.submit(item(1), model="busy"))
    await until(lambda: busy.started == 1)
    queued = asyncio.create_task(engine.submit(item(2), model="busy"))
    await until(lambda: engine.status().queue_depth == 1)
    newcomer = asyncio.create_task(engine.submit(item(3), model="late"))
    await until(lambda: engine.status().queue_depth == 2)
    busy.release(2)
    await asyncio.gather(running, queued, newcomer)
    # "late" needed room; "busy" was least recently used but had a queued job, so "idle" went.
    assert states(engine) == {"busy": "ready", "idle": "unloaded", "late": "ready"}
    assert busy.unloads == 0 and idle.unloads == 1


async def test_when_every_model_is_busy_the_newcomer_waits_then_takes_their_place(
    start_engine: StartEngine,
) -> None:
    journal = Journal()
    busy = LoggingFake("busy", journal, held=True, memory={"busy": 100})
    late = LoggingFake("late", journal, memory={"late": 100})
    engine = await start_engine(named(busy, late), idle_timeout=-1, memory_budget=150)
    jobs = [asyncio.create_task(engine.submit(item(1), model="busy"))]
    await until(lambda: busy.started == 1)
    jobs.append(asyncio.create_task(engine.submit(item(2), model="busy")))  # before the newcomer
    await until(lambda: engine.status().queue_depth == 1)
    jobs.append(asyncio.create_task(engine.submit(item(3), model="late")))
    await until(lambda: engine.status().queue_depth == 2)
    busy.release()
    await until(lambda: busy.started == 2)  # "busy" finishes what it had first ...
    waiting = {model.name: model.waiting_for_memory for model in engine.status().models}
    assert waiting == {"busy": False, "late": True} and states(engine)["late"] == "unloaded"
    jobs.append(asyncio.create_task(engine.submit(item(4), model="busy")))  # after the newcomer
    await until(lambda: engine.status().queue_depth == 2)
    busy.release(2)
    await asyncio.gather(*jobs)
    # ... then makes room, and its job that came after the newcomer's waits for the newcomer.
    assert [name for name, _ in journal.batches] == ["busy", "busy", "late", "busy"]
    assert busy.unloads == 1 and late.unloads == 1


async def test_a_model_larger_than_the_whole_budget_is_refused_with_its_size(
    start_engine: StartEngine,
) -> None:
    huge = FakeCaptioner(model_id="huge", memory={"huge": 3 * 2**30})
    engine = await start_engine(named(FakeCaptioner(model_id="small"), huge), memory_budget=2**30)
    with pytest.raises(ModelTooLarge) as info:
        await engine.submit(item(), model="huge")
    assert info.value.status == 503
    assert "3.0 GiB" in info.value.message and "1.0 GiB" in info.value.message
    assert huge.loads == 0
    assert (await engine.submit(item())).text  # the server keeps serving the others
    with pytest.raises(ModelTooLarge):
        await engine.load("huge")


async def test_adapters_on_one_base_fit_together_where_two_copies_would_not(
    start_engine: StartEngine,
) -> None:
    base = {"base": 100}
    plain = FakeCaptioner(model_id="plain", memory=base)
    styled = FakeCaptioner(model_id="styled", memory={**base, "lora": 5})
    engine = await start_engine(named(plain, styled), idle_timeout=-1, memory_budget=120)
    await asyncio.gather(engine.submit(item(), model="plain"), engine.submit(item(), model="styled"))
    assert states(engine) == {"plain": "ready", "styled": "ready"}
    assert engine.status().memory_used == 105


# --- fairness and idle timeouts ---------------------------------------------------------------------


async def test_models_take_turns_batch_by_batch(start_engine: StartEngine) -> None:
    journal = Journal()
    crowd, lone = LoggingFake("crowd", journal, held=True), LoggingFake("lone", journal)
    engine = await start_engine(named(crowd, lone), idle_timeout=-1, max_batch_size=1)
    await engine.load("lone")
    jobs = [asyncio.create_task(engine.submit(item(n), model="crowd")) for n in range(5)]
    await until(lambda: crowd.started == 1)
    await until(lambda: engine.status().queue_depth == 4)
    jobs.append(asyncio.create_task(engine.submit(item(9), model="lone")))
    await until(lambda: engine.status().queue_depth == 5)
    crowd.release(5)
    await asyncio.gather(*jobs)
    order = [name for name, _ in journal.batches]
    assert order == ["crowd", "lone", "crowd", "crowd", "crowd", "crowd"]


async def test_each_model_unloads_after_its_own_idle_time(start_engine: StartEngine) -> None:
    clock = FakeClock()
    quick, slow = FakeCaptioner(model_id="quick"), FakeCaptioner(model_id="slow")
    engine = await start_engine(named(quick, slow, quick=10), clock=clock, idle_timeout=100)
    await asyncio.gather(engine.submit(item(), model="quick"), engine.submit(item(), model="slow"))
    await until(lambda: clock.sleepers > 0)
    await clock.advance(20)
    await until(lambda: states(engine)["quick"] == "unloaded")
    assert states(engine)["slow"] == "ready"
    assert [model.idle_timeout for model in engine.status().models] == [10, 100]
    await clock.advance(100)
    await until(lambda: states(engine)["slow"] == "unloaded")


async def test_status_lists_every_model_with_its_state_memory_and_last_use(
    start_engine: StartEngine,
) -> None:
    used = FakeCaptioner(model_id="used", memory={"used": 42})
    engine = await start_engine(named(used, FakeCaptioner(model_id="spare")), idle_timeout=-1)
    before = time.time()
    await engine.submit(item(), model="used")
    data = engine.status().as_dict()
    first, second = data["models"]
    assert first["name"] == "used" and first["state"] == "ready" and first["default"] is True
    assert first["memory_bytes"] == 42 and first["last_used"] >= before
    assert second["state"] == "unloaded" and second["last_used"] is None and second["default"] is False
    assert data["memory_budget"] is None and data["memory_used"] == 42


async def test_the_systemd_status_line_names_each_model_when_there_are_several(
    start_engine: StartEngine,
) -> None:
    from vision_server.server import describe

    engine = await start_engine(named(FakeCaptioner(model_id="a"), FakeCaptioner(model_id="b")))
    await engine.submit(item(), model="b")
    assert describe(engine.status()) == "models a unloaded, b ready; queue 0, running 0"
    single = await start_engine(FakeCaptioner())
    assert describe(single.status()) == "model unloaded, queue 0, running 0"  # as before
