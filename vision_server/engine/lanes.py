"""Priority lanes: interactive work ahead of bulk work, bulk clients served in turn.

A person waiting for one caption should not wait behind a folder run of thousands of images, and
two folder runs should share the server rather than run one after the other. So the queue has two
lanes. When a batch is formed, interactive jobs go first and bulk jobs fill what room is left.

Inside the bulk lane turns come in two levels. Hosts (the peer address, or the client a
``--trusted-proxy`` names; :attr:`JobLabels.host`) take turns first, one job per host per round;
inside one host its clients (the ``X-Client-Id`` header, :attr:`JobLabels.client_id`) take turns
for that host's share, each in its own arrival order. Two folder runs on one machine so share
that machine's turn, while a host that sends many different client ids still gets one host's
share and cannot starve the others.

Memory stays bounded: a host or client id is kept only while it has a job waiting (it is dropped
when its last job is taken, removed or abandoned), and the lane never holds more than the queue's
``maxsize`` jobs, so inventing ids cannot create more keys than that.

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


class HostTurns:
    """One host's bulk jobs by client id, the id served longest ago first; never holds an empty id."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[CaptionJob]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._clients)

    @property
    def client_ids(self) -> int:
        """How many client ids have jobs waiting."""
        return len(self._clients)

    def __iter__(self) -> Iterator[CaptionJob]:
        for jobs in list(self._clients.values()):
            yield from jobs

    def append(self, job: CaptionJob) -> None:
        self._clients.setdefault(job.labels.client_id, deque()).append(job)

    def head(self) -> CaptionJob | None:
        return next((jobs[0] for jobs in self._clients.values()), None)

    def take_one(self, key: GenerationOptions) -> CaptionJob | None:
        """The oldest job with options ``key`` of the first client id (in turn order) that has one."""
        for client_id, jobs in self._clients.items():
            job = next((job for job in jobs if job.batch_key == key), None)
            if job is None:
                continue
            jobs.remove(job)
            if jobs:
                self._clients.move_to_end(client_id)
            else:
                del self._clients[client_id]
            return job  # the loop ends here, so changing the order above is safe
        return None

    def remove(self, job: CaptionJob) -> bool:
        jobs = self._clients.get(job.labels.client_id)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._clients[job.labels.client_id]
        return True

    def drop_abandoned(self) -> int:
        """Forget jobs nobody waits for; how many were dropped."""
        dropped = 0
        for client_id in list(self._clients):
            jobs = self._clients[client_id]
            kept = deque(job for job in jobs if not job.abandoned)
            dropped += len(jobs) - len(kept)
            if kept:
                self._clients[client_id] = kept
            else:
                del self._clients[client_id]
        return dropped


class BulkLane:
    """Bulk jobs grouped by host, then by client id; :meth:`take` hands them out in turns."""

    def __init__(self) -> None:
        # Hosts in turn order: the one served longest ago first, a newcomer last.
        self._hosts: OrderedDict[str, HostTurns] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[CaptionJob]:
        for host in list(self._hosts.values()):
            yield from host

    def append(self, job: CaptionJob) -> None:
        self._hosts.setdefault(job.labels.host, HostTurns()).append(job)
        self._count += 1

    def head(self) -> CaptionJob | None:
        """The job that would be handed out first: the oldest of the client whose turn it is."""
        return next((host.head() for host in self._hosts.values()), None)

    def take(self, key: GenerationOptions, limit: int) -> list[CaptionJob]:
        """Up to ``limit`` jobs with generation options ``key``, one per host per round.

        A host that got a job moves to the end of the turn order (and inside it, the client id
        that got it), so the next batch starts with the host after it: over many batches every
        busy host gets the same share, and every busy client id the same share of its host's.
        """
        taken: list[CaptionJob] = []
        while len(taken) < limit:
            before = len(taken)
            for name in list(self._hosts):
                if len(taken) >= limit:
                    break
                host = self._hosts[name]
                job = host.take_one(key)
                if job is None:
                    continue
                taken.append(job)
                if host:
                    self._hosts.move_to_end(name)
                else:
                    del self._hosts[name]
            if len(taken) == before:
                break
        self._count -= len(taken)
        return taken

    def remove(self, job: CaptionJob) -> bool:
        host = self._hosts.get(job.labels.host)
        if host is None or not host.remove(job):
            return False
        if not host:
            del self._hosts[job.labels.host]
        self._count -= 1
        return True

    def drop_abandoned(self) -> None:
        for name in list(self._hosts):
            host = self._hosts[name]
            self._count -= host.drop_abandoned()
            if not host:
                del self._hosts[name]

    def take_all(self) -> list[CaptionJob]:
        jobs = list(self)
        self._hosts.clear()
        self._count = 0
        return jobs

    def keys(self) -> int:
        """How many host and client-id entries the lane holds (at most two per waiting job)."""
        return sum(1 + host.client_ids for host in self._hosts.values())
