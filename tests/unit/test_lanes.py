"""Priority lanes in the engine: interactive ahead of bulk, bulk never starves, bulk clients take turns."""

from __future__ import annotations

import asyncio
import itertools
import threading

from PIL import Image

from tests.conftest import StartEngine
from tests.support.clock import settle
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.engine.jobs import CaptionJob, JobLabels, Lane
from vision_server.engine.lanes import BulkLane
from vision_server.images import fit_image
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner

BULK = JobLabels(Lane.BULK, "folder-run")


def item(shade: int = 0) -> CaptionItem:
    image = fit_image(Image.new("RGB", (8, 8), (shade % 256, 0, shade // 256)), FAKE_SPEC)
    return CaptionItem(image, "<CAPTION>", GenerationOptions())


class RecordingFake(FakeCaptioner):
    """Records the items of every batch; the first batch waits until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[CaptionItem]] = []
        self.gate, self.entered = threading.Event(), threading.Event()

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.batches.append(list(batch))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().caption(batch)

    def batch_of(self, wanted: CaptionItem) -> int:
        """The 0-based index of the batch ``wanted`` ran in."""
        return next(n for n, batch in enumerate(self.batches) if any(i is wanted for i in batch))


def count(items: list[CaptionItem], batch: list[CaptionItem]) -> int:
    """How many of ``items`` (by identity) are in ``batch``."""
    return sum(any(i is b for b in batch) for i in items)


async def test_an_interactive_job_behind_200_bulk_jobs_runs_in_the_very_next_batch(
    start_engine: StartEngine,
) -> None:
    fake = RecordingFake()
    engine = await start_engine(fake, max_batch_size=8, max_batch_wait=0)
    bulk = [asyncio.create_task(engine.submit(item(n), labels=BULK)) for n in range(200)]
    assert await asyncio.to_thread(fake.entered.wait, 10)  # the first bulk batch is running
    await settle()
    assert engine.status().lane_depths == {"interactive": 0, "bulk": 192}
    urgent = item(999)
    asked = asyncio.create_task(engine.submit(urgent))
    await settle()
    assert engine.status().lane_depths == {"interactive": 1, "bulk": 192}
    fake.gate.set()
    assert (await asked).text == FakeCaptioner.expected(urgent)
    assert fake.batch_of(urgent) == 1
    assert len(fake.batches[1]) == 8  # and bulk jobs filled the rest of that batch
    await asyncio.gather(*bulk)


async def test_bulk_progresses_under_a_steady_interactive_load(start_engine: StartEngine) -> None:
    fake = RecordingFake()
    fake.gate.set()
    engine = await start_engine(fake, max_batch_size=8, max_batch_wait=0, bulk_aging=4)
    bulk_items = [item(n) for n in range(10)]
    bulk = [asyncio.create_task(engine.submit(i, labels=BULK)) for i in bulk_items]
    stop = asyncio.Event()

    async def interactive_user(base: int) -> None:  # always a batch's worth waiting: 16 users
        n = 0
        while not stop.is_set():
            await engine.submit(item(1000 + base * 100 + n % 100))
            n += 1

    users = [asyncio.create_task(interactive_user(u)) for u in range(16)]
    await asyncio.wait_for(asyncio.gather(*bulk), 30)
    stop.set()
    await asyncio.gather(*users)
    with_bulk = [n for n, batch in enumerate(fake.batches) if count(bulk_items, batch)]
    # Interactive work fills every batch, so only aging lets bulk in: a quarter of one batch in
    # every five, and interactive jobs fill the rest of it.
    assert len(with_bulk) == 5
    assert all(count(bulk_items, fake.batches[n]) == 2 and len(fake.batches[n]) == 8 for n in with_bulk)
    assert all(later - earlier == 5 for earlier, later in itertools.pairwise(with_bulk))


async def test_two_bulk_clients_progress_at_the_same_rate(start_engine: StartEngine) -> None:
    fake = RecordingFake()
    engine = await start_engine(fake, max_batch_size=4, max_batch_wait=0)
    first = [item(n) for n in range(44)]
    second = [item(100 + n) for n in range(40)]
    jobs = [asyncio.create_task(engine.submit(i, labels=JobLabels(Lane.BULK, "a"))) for i in first]
    assert await asyncio.to_thread(fake.entered.wait, 10)  # a batch of client a's jobs runs
    jobs += [asyncio.create_task(engine.submit(i, labels=JobLabels(Lane.BULK, "b"))) for i in second]
    await settle()
    fake.gate.set()
    await asyncio.gather(*jobs)
    assert len(fake.batches) == 21 and len(fake.batches[0]) == 4
    for batch in fake.batches[1:]:  # first come, first served would run all of a's jobs first
        assert count(first, batch) == 2 and count(second, batch) == 2


async def test_a_full_bulk_lane_never_refuses_interactive_work(start_engine: StartEngine) -> None:
    fake = RecordingFake()
    engine = await start_engine(fake, max_queue=3, max_batch_size=1, max_batch_wait=0)
    jobs = [asyncio.create_task(engine.submit(item(0), labels=BULK))]
    assert await asyncio.to_thread(fake.entered.wait, 10)  # running: the lane is empty again
    jobs += [asyncio.create_task(engine.submit(item(n), labels=BULK)) for n in range(1, 4)]
    await settle()
    assert engine.status().lane_depths["bulk"] == 3
    refused = asyncio.create_task(engine.submit(item(9), labels=BULK))
    await settle()
    assert refused.done() and "bulk queue is full" in str(refused.exception())
    jobs += [asyncio.create_task(engine.submit(item(10 + n))) for n in range(3)]
    await settle()
    assert engine.status().lane_depths == {"interactive": 3, "bulk": 3}
    fake.gate.set()
    assert all(result.text for result in await asyncio.gather(*jobs))


# --- the bulk lane's turns, on the lane itself ------------------------------------------------------

SAME_IMAGE = item()


def bulk_job(host: str, client_id: str = "") -> CaptionJob:
    future = asyncio.get_running_loop().create_future()
    return CaptionJob(SAME_IMAGE, future, labels=JobLabels(Lane.BULK, host, client_id))


def shares(taken: list[CaptionJob]) -> dict[str, int]:
    """Jobs handed out per host/client id."""
    counts: dict[str, int] = {}
    for job in taken:
        key = f"{job.labels.host}/{job.labels.client_id}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def drain(lane: BulkLane, batches: int, size: int) -> list[CaptionJob]:
    return [job for _ in range(batches) for job in lane.take(GenerationOptions(), size)]


async def test_a_host_with_many_client_ids_gets_one_hosts_share() -> None:
    lane = BulkLane()
    for n in range(10):  # host a: ten folder runs (or one client inventing ids), 20 jobs each
        for _ in range(20):
            lane.append(bulk_job("10.0.0.1", f"id-{n}"))
    for _ in range(200):
        lane.append(bulk_job("10.0.0.2", "only"))
    taken = drain(lane, batches=25, size=4)
    by_host = {"10.0.0.1": 0, "10.0.0.2": 0}
    for job in taken:
        by_host[job.labels.host] += 1
    assert by_host == {"10.0.0.1": 50, "10.0.0.2": 50}
    # and inside host a, its ten ids share its half evenly
    assert {key: n for key, n in shares(taken).items() if key.startswith("10.0.0.1")} == {
        f"10.0.0.1/id-{n}": 5 for n in range(10)
    }


async def test_two_client_ids_on_one_host_split_that_hosts_turn() -> None:
    lane = BulkLane()
    for _ in range(30):
        lane.append(bulk_job("a", "run-1"))
        lane.append(bulk_job("a", "run-2"))
        lane.append(bulk_job("b"))
    assert shares(drain(lane, batches=10, size=4)) == {"a/run-1": 10, "a/run-2": 10, "b/": 20}


async def test_turns_skip_jobs_of_other_options_and_keep_each_clients_order() -> None:
    lane = BulkLane()
    greedy = GenerationOptions(num_beams=1)
    other = CaptionJob(
        CaptionItem(SAME_IMAGE.image, "<CAPTION>", greedy),
        asyncio.get_running_loop().create_future(),
        labels=JobLabels(Lane.BULK, "a", "x"),
    )
    first, second = bulk_job("a", "x"), bulk_job("a", "x")
    for job in (other, first, second):
        lane.append(job)
    assert lane.head() is other
    assert lane.take(GenerationOptions(), 8) == [first, second]
    assert lane.take(greedy, 8) == [other] and len(lane) == 0


async def test_keys_live_only_while_they_have_waiting_jobs() -> None:
    lane = BulkLane()
    jobs = [bulk_job(f"host-{n % 7}", f"id-{n}") for n in range(300)]
    for job in jobs:
        lane.append(job)
    assert lane.keys() == 7 + 300  # one entry per host and per id: bounded by the waiting jobs
    jobs[0].future.cancel()  # its client left
    assert lane.remove(jobs[1])
    lane.drop_abandoned()
    assert len(lane) == 298 and lane.keys() == 7 + 298
    assert len(lane.take(GenerationOptions(), 1000)) == 298
    assert len(lane) == 0 and lane.keys() == 0 and lane.head() is None
