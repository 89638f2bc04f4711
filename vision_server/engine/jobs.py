"""Caption jobs and the labels adapters give them (lane, host and client id, keep-alive).

Adapters only label a job; what a label means (which batch it joins, when the model unloads) is
decided by the engine (:mod:`vision_server.engine.queue`, :mod:`vision_server.engine.scheduler`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from vision_server.captioner import Caption, CaptionItem, GenerationOptions


class Lane(str, enum.Enum):
    """Which lane a job waits in (see :mod:`vision_server.engine.lanes`)."""

    INTERACTIVE = "interactive"
    BULK = "bulk"

    @classmethod
    def parse(cls, value: str) -> Lane:
        """A lane from its name in any case; ValueError names the choices."""
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = " or ".join(repr(lane.value) for lane in cls)
            raise ValueError(f"must be {choices}, not {value!r}") from None


@dataclass(frozen=True)
class JobLabels:
    """What a request says about how its jobs should be scheduled."""

    lane: Lane = Lane.INTERACTIVE
    # Bulk work takes turns in two levels (see vision_server.engine.lanes): hosts first, by this
    # key (the peer address, or the client a --trusted-proxy names), then inside one host the
    # clients, by ``client_id`` (the X-Client-Id header; "" when none is sent). A host cannot win
    # more turns with more ids.
    host: str = "-"
    client_id: str = ""
    # Seconds the model should stay loaded after this job's batch, as granted by
    # Engine.grant_keep_alive: 0 unloads once the queue drains, negative keeps it loaded until
    # another request sets a keep-alive; None leaves whatever applies now.
    keep_alive: float | None = None


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
    labels: JobLabels = field(default_factory=JobLabels)

    @property
    def lane(self) -> Lane:
        return self.labels.lane

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


def fail(job: CaptionJob, error: Exception) -> None:
    """Answer ``job`` with ``error`` unless its client has its answer already (or left)."""
    if not job.future.done():
        job.future.set_exception(error)
