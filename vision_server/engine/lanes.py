"""Priority lanes: interactive work ahead of bulk work, bulk clients served in turn.

A person waiting for one caption should not wait behind a folder run of thousands of images, and
two folder runs should share the server rather than run one after the other. So the queue has two
lanes. When a batch is formed, interactive jobs go first and bulk jobs fill what room is left;
inside the bulk lane the clients take turns (round-robin by client key), each in its own
arrival order.

Aging, so bulk never starves: a batch that leaves waiting bulk work out counts as one pass-over;
after ``bulk_aging`` (``--bulk-aging``) pass-overs in a row the next batch is built around the
bulk lane's next job (its generation options decide who joins) and keeps a quarter of its places
(at least one) for bulk jobs; interactive jobs fill the rest first. Under a load of interactive
jobs that fills every batch, bulk still gets that share of one batch in every ``bulk_aging + 1``;
a lighter interactive load never waits for aging at all.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from vision_server.captioner import GenerationOptions
from vision_server.engine.jobs import CaptionJob


class BulkLane:
    """Bulk jobs grouped by client; :meth:`take` hands them out one client at a time."""

    def __init__(self) -> None:
        # Clients in turn order: the one served longest ago first, a newcomer last.
        self._clients: OrderedDict[str, deque[CaptionJob]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[CaptionJob]:
        for jobs in list(self._clients.values()):
            yield from jobs

    def append(self, job: CaptionJob) -> None:
        self._clients.setdefault(job.labels.client, deque()).append(job)
        self._count += 1

    def head(self) -> CaptionJob | None:
        """The job that would be handed out first: the oldest of the client whose turn it is."""
        for jobs in self._clients.values():
            if jobs:
                return jobs[0]
        return None

    def take(self, key: GenerationOptions, limit: int) -> list[CaptionJob]:
        """Up to ``limit`` jobs with generation options ``key``, one per client per round.

        A client that got a job moves to the end of the turn order, so the next batch starts
        with the client after it: over many batches every busy client gets the same share.
        """
        taken: list[CaptionJob] = []
        while len(taken) < limit:
            before = len(taken)
            for client in list(self._clients):
                if len(taken) >= limit:
                    break
                jobs = self._clients[client]
                job = next((job for job in jobs if job.batch_key == key), None)
                if job is None:
                    continue
                jobs.remove(job)
                taken.append(job)
                self._served(client)
            if len(taken) == before:
                break
        self._count -= len(taken)
        return taken

    def _served(self, client: str) -> None:
        if self._clients[client]:
            self._clients.move_to_end(client)
        else:
            del self._clients[client]

    def remove(self, job: CaptionJob) -> bool:
        jobs = self._clients.get(job.labels.client)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._clients[job.labels.client]
        self._count -= 1
        return True

    def drop_abandoned(self) -> None:
        for client in list(self._clients):
            kept = deque(job for job in self._clients[client] if not job.abandoned)
            self._count -= len(self._clients[client]) - len(kept)
            if kept:
                self._clients[client] = kept
            else:
                del self._clients[client]

    def take_all(self) -> list[CaptionJob]:
        jobs = list(self)
        self._clients.clear()
        self._count = 0
        return jobs
