"""Caption jobs and the bounded queue they wait in.

The queue is a deque rather than :class:`asyncio.Queue` because batching needs to take every
*compatible* waiting job, not only the head, while keeping the others in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.errors import QueueFull


@dataclass(eq=False)
class CaptionJob:
    """One image waiting for a caption. The future is cancelled when its client goes away."""

    item: CaptionItem
    future: asyncio.Future[Caption]
    request_id: str = "-"
    deadline: float = float("inf")  # on the engine's clock (time.monotonic() by default)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # set when the job's batch starts
    batch_size: int = 0  # size of the batch it ran in

    @property
    def batch_key(self) -> GenerationOptions:
        return self.item.options.batch_key

    @property
    def queue_wait(self) -> float | None:
        """Seconds between queueing and the start of its batch; None while it still waits."""
        return None if self.started_at is None else self.started_at - self.enqueued_at

    @property
    def abandoned(self) -> bool:
        """True when nobody waits for the answer any more (client gone, deadline hit)."""
        return self.future.done()


class JobQueue:
    """A bounded FIFO of jobs that can hand out batches of compatible jobs."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._jobs: deque[CaptionJob] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[CaptionJob]:
        return iter(self._jobs)

    def put(self, job: CaptionJob, *, retry_after: float) -> None:
        if len(self._jobs) >= self.maxsize:
            raise QueueFull(
                f"The queue is full ({self.maxsize} jobs waiting); retry in {retry_after:.0f} s.",
                retry_after=retry_after,
            )
        self._jobs.append(job)
        self._arrived.set()

    async def wait_for_room(self) -> None:
        """Wait until a job can be put without being refused (for callers that must not be refused).

        Only the caller that wakes first gets the place when several wait; the others wait again.
        """
        while len(self._jobs) >= self.maxsize:
            self._room.clear()
            await self._room.wait()

    async def wait(self, timer: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Wait until a job is queued (or :meth:`wake` is called); False if ``timer()`` ends first."""
        if self._jobs:
            return True
        self._arrived.clear()
        if timer is None:
            await self._arrived.wait()
            return True
        arrival = asyncio.ensure_future(self._arrived.wait())
        expiry = asyncio.ensure_future(timer())
        try:
            await asyncio.wait({arrival, expiry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()
            expiry.cancel()
        return self._arrived.is_set()

    def wake(self) -> None:
        """Interrupt :meth:`wait` (used for control messages)."""
        self._arrived.set()

    def discard(self, job: CaptionJob) -> bool:
        """Remove ``job`` if it is still waiting (its client left); True when it was."""
        try:
            self._jobs.remove(job)
        except ValueError:
            return False
        self._room.set()
        return True

    def drop_abandoned(self) -> None:
        self._jobs = deque(job for job in self._jobs if not job.abandoned)
        self._room.set()

    def take_batch(self, limit: int) -> list[CaptionJob]:
        """The oldest job plus every waiting job with the same generation options, up to ``limit``.

        Jobs left behind keep their order, and the oldest of them leads the next batch, so no
        job starves behind a stream of differently-configured ones.
        """
        self.drop_abandoned()
        if not self._jobs:
            return []
        key = self._jobs[0].batch_key
        batch: list[CaptionJob] = []
        rest: deque[CaptionJob] = deque()
        for job in self._jobs:
            if len(batch) < limit and job.batch_key == key:
                batch.append(job)
            else:
                rest.append(job)
        self._jobs = rest
        self._room.set()
        return batch

    def count_compatible(self, key: GenerationOptions) -> int:
        return sum(1 for job in self._jobs if job.batch_key == key and not job.abandoned)

    def take_all(self) -> list[CaptionJob]:
        jobs, self._jobs = list(self._jobs), deque()
        self._room.set()
        return jobs
