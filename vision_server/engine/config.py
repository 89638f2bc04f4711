"""The engine's knobs in one frozen object that every part of the engine reads.

The server builds it from its settings (:mod:`vision_server.runtime`); tests, benchmarks and the
offline captioner build their own. It lives apart from the scheduler so the engine's parts
(batches, timers, turns) can read it without importing the engine itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from vision_server.engine.queue import DEFAULT_BULK_AGING


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs, separate from :class:`Settings` so the engine needs no HTTP config."""

    max_queue: int = 256  # per lane
    max_batch_size: int = 16
    max_batch_wait: float = 0.005
    idle_timeout: float = 300.0
    request_timeout: float = 600.0
    worker_restart_delay: float = 1.0  # seconds a dead worker stays visibly dead before its restart
    # Seconds the queue must stay empty after a batch before the memory batches and decodes freed
    # is handed back (Captioner.trim_memory): once per burst, not between a client's requests.
    trim_after: float = 1.0
    # Batches in a row that may leave waiting bulk jobs out before one is formed bulk-first.
    bulk_aging: int = DEFAULT_BULK_AGING
    # Most seconds a request's keep-alive may ask for; None: the idle timeout; negative: no cap.
    max_keep_alive: float | None = None
    # Seconds an idle model spends in the warm tier (host memory) before it is freed; 0 skips it.
    offload_timeout: float = 1800.0
    # Bytes the loaded models' weights may take together (device memory; RAM on the CPU). Before a
    # load that would pass it, idle models are unloaded least recently used first. None: no budget.
    memory_budget: int | None = None
    # Whether a model's failed load gets a log line. False where the caller says the failure
    # itself (`vision-server caption`, once, in its summary); an unexpected one (with a
    # traceback) is logged all the same.
    log_load_failures: bool = True
