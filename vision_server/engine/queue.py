"""The bounded two-lane queue the worker takes its batches from.

A hand-made structure rather than :class:`asyncio.Queue`: batching takes every *compatible*
waiting job, not only the head, interactive jobs before bulk ones, and bulk clients in turn
(:mod:`vision_server.engine.lanes`). The size limit applies per lane, so a folder run that fills
the bulk lane never gets an interactive request refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

from vision_server.captioner import GenerationOptions
from vision_server.engine.jobs import CaptionJob, Lane
from vision_server.engine.lanes import BulkLane
from vision_server.errors import QueueFull

DEFAULT_BULK_AGING = 4
BULK_SHARE = 4  # an aged batch keeps 1/BULK_SHARE of its places for bulk jobs


class JobQueue:
    """Interactive jobs in arrival order, bulk jobs by client; at most ``maxsize`` per lane."""

    def __init__(
        self,
        maxsize: int,
        *,
        bulk_aging: int = DEFAULT_BULK_AGING,
        arrived: asyncio.Event | None = None,
    ) -> None:
        self.maxsize = maxsize
        self.bulk_aging = bulk_aging
        self._interactive: deque[CaptionJob] = deque()
        self._bulk = BulkLane()
        self._passed_over = 0  # batches in a row that left waiting bulk jobs out
        # Set on every put: the engine passes one event to all its models' queues and waits on it.
        self.arrived = arrived if arrived is not None else asyncio.Event()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._interactive) + len(self._bulk)

    def __iter__(self) -> Iterator[CaptionJob]:
        yield from list(self._interactive)
        yield from self._bulk

    def depth(self, lane: Lane) -> int:
        return len(self._interactive) if lane is Lane.INTERACTIVE else len(self._bulk)

    def full(self, lane: Lane) -> bool:
        return self.depth(lane) >= self.maxsize

    def put(self, job: CaptionJob, *, retry_after: float) -> None:
        if self.full(job.lane):
            raise QueueFull(
                f"The {job.lane.value} queue is full ({self.maxsize} jobs waiting); "
                f"retry in {retry_after:.0f} s.",
                retry_after=retry_after,
            )
        if job.lane is Lane.INTERACTIVE:
            self._interactive.append(job)
        else:
            self._bulk.append(job)
        self.arrived.set()

    async def wait_for_room(self, lane: Lane = Lane.INTERACTIVE) -> None:
        """Wait until a job can be put in ``lane`` without being refused.

        Only the caller that wakes first gets the place when several wait; the others wait again.
        """
        while self.full(lane):
            self._room.clear()
            await self._room.wait()

    def discard(self, job: CaptionJob) -> bool:
        """Remove ``job`` if it is still waiting (its client left); True when it was."""
        if job.lane is Lane.BULK:
            removed = self._bulk.remove(job)
        else:
            try:
                self._interactive.remove(job)
                removed = True
            except ValueError:
                removed = False
        if removed:
            self._room.set()
        return removed

    def drop_abandoned(self) -> None:
        self._interactive = deque(job for job in self._interactive if not job.abandoned)
        self._bulk.drop_abandoned()
        self._room.set()

    def oldest(self) -> float | None:
        """When the job waiting longest was queued (on the engine's clock); None when empty."""
        return min((job.enqueued_at for job in self if not job.abandoned), default=None)

    def leader(self) -> CaptionJob | None:
        """The job the next batch is built around (its options decide who may join)."""
        if self._interactive and not self._bulk_is_due():
            return self._interactive[0]
        return self._bulk.head() or (self._interactive[0] if self._interactive else None)

    def _bulk_is_due(self) -> bool:
        return bool(self._bulk) and self._passed_over >= self.bulk_aging

    def take_batch(self, limit: int) -> list[CaptionJob]:
        """The leader and every waiting job with the same generation options, up to ``limit``.

        Interactive jobs first, then bulk jobs in client turns; when aging says so, the batch is
        built around the bulk lane's next job and a quarter of it is kept for bulk jobs.
        Jobs left behind keep their order, and the oldest of a lane leads its next batch, so no
        job starves behind a stream of differently-configured ones.
        """
        self.drop_abandoned()
        leader = self.leader()
        if leader is None:
            return []
        key = leader.batch_key
        # Bulk's share: none unless aging says so (then a quarter of the places, at least one),
        # so interactive jobs are never held back by aging unless they fill batches themselves.
        reserved = max(1, limit // BULK_SHARE) if leader.lane is Lane.BULK else 0
        batch = self._take_interactive(key, limit - reserved)
        batch += self._bulk.take(key, limit - len(batch))
        left_out = self._bulk and not any(job.lane is Lane.BULK for job in batch)
        self._passed_over = self._passed_over + 1 if left_out else 0
        self._room.set()
        return batch

    def _take_interactive(self, key: GenerationOptions, limit: int) -> list[CaptionJob]:
        batch: list[CaptionJob] = []
        rest: deque[CaptionJob] = deque()
        for job in self._interactive:
            if len(batch) < limit and job.batch_key == key:
                batch.append(job)
            else:
                rest.append(job)
        self._interactive = rest
        return batch

    def count_compatible(self, key: GenerationOptions) -> int:
        return sum(1 for job in self if job.batch_key == key and not job.abandoned)

    def take_all(self) -> list[CaptionJob]:
        jobs = [*self._interactive, *self._bulk.take_all()]
        self._interactive = deque()
        self._room.set()
        return jobs
