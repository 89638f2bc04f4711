"""The last few batches the worker ran, for people watching the server (the web page's status panel).

Prometheus has the histograms; a person wants "what just happened": how big the last batches were
and how many images a second they went through. An :class:`EngineObserver`, so the engine itself
keeps no history.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from vision_server.engine.observer import EngineObserver


@dataclass(frozen=True)
class BatchRecord:
    finished_at: float  # unix time
    size: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0


class RecentBatches(EngineObserver):
    """A ring of the last ``keep`` batches (appended from the event loop only)."""

    def __init__(self, keep: int = 20) -> None:
        self._batches: deque[BatchRecord] = deque(maxlen=keep)

    def batch_finished(self, model: str, size: int, seconds: float) -> None:
        self._batches.append(BatchRecord(time.time(), size, seconds))

    def snapshot(self) -> list[BatchRecord]:
        """Oldest first."""
        return list(self._batches)
