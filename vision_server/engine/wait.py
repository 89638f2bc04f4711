"""How long a job refused now would have waited: the seconds behind ``Retry-After``.

A newcomer waits for the work in progress (a batch in the model thread, a model loading) and for
the jobs queued before it. Once a batch has finished, the measured seconds per job price both.
Before that there is no rate to go by, and a guessed one (a second a job) told clients "retry in
2 s" while a model loaded and captioned its first batch on the CPU for 25 s. What is known then
is how long the work in progress has run so far: it is taken to need at least as long again, and
each queued job at least what the running batch has taken per job so far. The estimate starts
low and grows while that work runs, so a client that comes back too early is told a longer wait,
never the same short one again.
"""

from __future__ import annotations

from dataclasses import dataclass

UNMEASURED_PER_JOB = 1.0  # seconds a job is taken to need before any batch has finished


@dataclass(frozen=True)
class WorkInProgress:
    """What the queue waits behind now, by how long it has run (seconds on the engine's clock)."""

    running: int = 0  # jobs of the batch in the model thread
    batch_ran: float = 0.0  # how long that batch has run (0 when none)
    load_ran: float = 0.0  # how long the longest load (or wake) in progress has run (0 when none)


def backlog_seconds(ahead: int, work: WorkInProgress, seconds_per_job: float | None) -> float:
    """Seconds until ``work`` and the ``ahead`` jobs queued before a newcomer are done.

    ``seconds_per_job`` is the measured rate, None before any batch has finished. Work in
    progress is never taken to end sooner than it has already run: a batch or a load that runs
    long (the first on a cold CPU, a reload after an idle unload) makes the wait longer, not a
    guess that stays short.
    """
    per_job = seconds_per_job
    if per_job is None:
        per_job = max(UNMEASURED_PER_JOB, work.batch_ran / work.running if work.running else 0.0)
    batch_left = max(work.running * per_job, work.batch_ran) if work.running else 0.0
    return work.load_ran + batch_left + ahead * per_job
