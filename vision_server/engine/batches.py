"""Running one model's batch: gather it, caption it in the model thread, settle every job.

The worker decides *whose* batch runs (:mod:`vision_server.engine.turns`); this forms it (the
head job and its compatible peers, a short wait for stragglers when busy), drops the jobs whose
client left or whose deadline passed, retries halves on out-of-memory down to single images, and
keeps the counters the status and ``Retry-After`` are computed from. A failed batch fails its
jobs, never the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from vision_server.captioner import Caption, Captioner, CaptionItem
from vision_server.engine.clock import Clock
from vision_server.engine.config import EngineConfig
from vision_server.engine.jobs import CaptionJob, fail
from vision_server.engine.keeper import ModelKeeper
from vision_server.engine.observer import EngineObserver
from vision_server.engine.slots import ModelSlot
from vision_server.engine.wait import WorkInProgress
from vision_server.errors import BadRequest, CaptionFailed, DeadlineExceeded, OutOfMemory, VisionServerError

log = logging.getLogger("vision_server.engine.scheduler")


class BatchRunner:
    """Forms and runs batches for the worker, and counts what ran."""

    def __init__(
        self, config: EngineConfig, observer: EngineObserver, clock: Clock, keeper: ModelKeeper
    ) -> None:
        self.config = config
        self.observer = observer
        self.clock = clock
        self.keeper = keeper
        self.running = 0  # jobs of the batch in the model thread now
        self.running_since: float | None = None  # on the clock: when that batch went in
        self.in_flight: list[CaptionJob] = []  # the batch the worker holds
        # A moving average of the seconds a job takes; None until a batch has finished (the
        # first measurement starts it: averaged with a guess, a first batch of 25 s a job on a
        # cold CPU gave 5.8 s, and Retry-After said as much).
        self.seconds_per_job: float | None = None
        self.batches = 0
        self.jobs_done = 0
        self.last_batch_size = 0

    async def collect(self, slot: ModelSlot) -> list[CaptionJob]:
        """Take the head job and its peers, giving stragglers ``max_batch_wait`` to join when busy.

        A lone job after a lone job (one client captioning one image at a time) does not wait:
        nobody is coming, and the wait would be pure latency.
        """
        queue = slot.queue
        queue.drop_abandoned()
        if not len(queue):
            return []
        head = queue.leader()
        assert head is not None
        limit = self.config.max_batch_size
        waiting = queue.count_compatible(head.batch_key)
        busy = waiting > 1 or self.last_batch_size > 1
        if self.config.max_batch_wait > 0 and busy and waiting < limit:
            await self.clock.sleep_until(self.clock.now() + self.config.max_batch_wait)
        return queue.take_batch(limit)

    async def run(self, slot: ModelSlot, batch: list[CaptionJob]) -> None:
        """Caption ``batch`` (held as in flight meanwhile) and settle each job's future."""
        self.in_flight = batch
        try:
            await self._run(slot, batch)
        finally:
            self.in_flight = []

    async def _run(self, slot: ModelSlot, batch: list[CaptionJob]) -> None:
        live = self._drop_expired(batch)
        if not live:
            return
        now = self.clock.now()
        for job in live:
            job.started_at, job.batch_size = now, len(live)
            self.observer.job_started(slot.name, now - job.enqueued_at)
        self.running = slot.running = len(live)
        self.running_since = now
        started = time.monotonic()
        try:
            items = [job.item for job in live]
            results = await self.keeper.in_model_thread(caption_splitting, slot.captioner, items)
            if len(results) != len(live):
                raise RuntimeError(f"the captioner returned {len(results)} results for {len(live)} images")
        except Exception as exc:  # a failed batch must never kill the worker
            fail_batch(live, exc)
            return
        finally:
            self._finish(slot, len(live), time.monotonic() - started)
            apply_keep_alive(slot, live)
        for job, result in zip(live, results, strict=True):
            if isinstance(result, VisionServerError):
                log.warning(
                    "request %s failed alone in its batch: %s",
                    job.request_id,
                    result,
                    extra={"request_id": job.request_id},
                )
                fail(job, result)
            elif not job.future.done():
                job.future.set_result(result)

    def _drop_expired(self, batch: list[CaptionJob]) -> list[CaptionJob]:
        now = self.clock.now()
        live = []
        for job in batch:
            if job.abandoned:
                continue
            if now >= job.deadline:
                fail(job, DeadlineExceeded("The request timed out while waiting in the queue."))
            else:
                live.append(job)
        return live

    def _finish(self, slot: ModelSlot, size: int, seconds: float) -> None:
        self.running = slot.running = 0
        self.running_since = None
        slot.trim_pending = True
        slot.last_finished = self.clock.now()
        slot.last_used = time.time()
        self.batches += 1
        self.jobs_done += size
        self.last_batch_size = size
        per_job = seconds / max(size, 1)
        before = self.seconds_per_job
        self.seconds_per_job = per_job if before is None else 0.8 * before + 0.2 * per_job
        self.observer.batch_finished(slot.name, size, seconds)

    def abandon(self, slots: Iterable[ModelSlot], error: Callable[[], VisionServerError]) -> None:
        """Fail the batch the worker held (it died, or hit a bug between batches) and forget it."""
        for job in self.in_flight:
            fail(job, error())
        self.in_flight, self.running, self.running_since = [], 0, None
        for slot in slots:
            slot.running = 0

    def work_in_progress(self, loads_since: Iterable[float]) -> WorkInProgress:
        """The batch running now and the longest of the loads begun at ``loads_since``, by how
        long each has run on the clock (what a refused newcomer waits behind)."""
        now = self.clock.now()
        return WorkInProgress(
            running=self.running,
            batch_ran=now - self.running_since if self.running and self.running_since is not None else 0.0,
            load_ran=max((now - since for since in loads_since), default=0.0),
        )

    @property
    def mean_batch_size(self) -> float:
        return self.jobs_done / self.batches if self.batches else 0.0


def apply_keep_alive(slot: ModelSlot, batch: list[CaptionJob]) -> None:
    """The latest request of the batch that asked for a keep-alive sets the model's."""
    asked = [job for job in batch if job.labels.keep_alive is not None]
    if asked:
        slot.keep_alive = max(asked, key=lambda job: job.enqueued_at).labels.keep_alive


def fail_batch(jobs: list[CaptionJob], exc: Exception) -> None:
    ids = ", ".join(job.request_id for job in jobs)
    keys = {"request_ids": [job.request_id for job in jobs]}  # JSON logs: a key to search by
    if isinstance(exc, VisionServerError):
        log.warning("batch failed (%s): %s", ids, exc, extra=keys)
    else:
        log.error("caption batch failed for request(s) %s", ids, exc_info=exc, extra=keys)
    for job in jobs:
        fail(job, exc if isinstance(exc, VisionServerError) else _caption_failed(exc, job.request_id))


def caption_splitting(captioner: Captioner, items: list[CaptionItem]) -> list[Caption | VisionServerError]:
    """Caption ``items``, answering each image on its own when the batch as a whole cannot be.

    On out-of-memory, or when one request in the batch is refused (a 4xx such as a prompt too long
    for the model), each half is retried, down to single images; a single image that still fails
    gets its error in its place in the list. So one request at fault fails alone, and its
    batch-mates from other clients are still captioned."""
    try:
        return list(captioner.caption(items))
    except (OutOfMemory, BadRequest) as exc:
        # Kept without its traceback, and the halves run after the handler: the failed call's
        # frames, and any GPU memory they still hold, must be gone before the next try.
        failure = exc.with_traceback(None)
    if len(items) == 1:
        return [failure]
    if isinstance(failure, OutOfMemory):
        log.warning("out of memory on a batch of %d; retrying in halves", len(items))
    else:
        log.info(
            "a batch of %d was refused (%s); retrying in halves to find the request at fault",
            len(items),
            failure,
        )
    middle = len(items) // 2
    return caption_splitting(captioner, items[:middle]) + caption_splitting(captioner, items[middle:])


def _caption_failed(exc: Exception, request_id: str) -> CaptionFailed:
    return CaptionFailed(
        f"Captioning failed ({type(exc).__name__}); see the server log for request id {request_id}."
    )
