"""Per-request accounting: how long a request's jobs waited in the queue and how big their batch was.

The HTTP layer opens a trace for each request in a context variable; :meth:`Engine.submit` runs in
the request's task and adds each job it finishes to that trace. So the access log learns the queue
wait and batch size of every request without the engine knowing about HTTP, and without any API
family having to pass something along.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class JobTrace:
    """What the engine did for one request (several jobs for a multi-image request)."""

    jobs: int = 0
    queue_wait: float = 0.0  # longest wait of the request's jobs, in seconds
    batch_size: int = 0  # largest batch one of them ran in

    def add(self, queue_wait: float, batch_size: int) -> None:
        self.jobs += 1
        self.queue_wait = max(self.queue_wait, queue_wait)
        self.batch_size = max(self.batch_size, batch_size)


CURRENT_TRACE: ContextVar[JobTrace | None] = ContextVar("vision_server_job_trace", default=None)


def record_job(queue_wait: float, batch_size: int) -> None:
    """Add a finished job to the current request's trace, if a request opened one."""
    trace = CURRENT_TRACE.get()
    if trace is not None:
        trace.add(queue_wait, batch_size)
