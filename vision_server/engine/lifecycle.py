"""Model states and the snapshot of engine status shown to clients."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class ModelState(str, enum.Enum):
    """unloaded → loading → ready → unloading → unloaded, plus failed (retried on the next job).

    With the warm tier, an idle ``ready`` model becomes ``offloaded`` (weights in host memory);
    a job wakes it (``loading`` → ``ready``), or after the offload timeout it is unloaded.
    """

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    OFFLOADED = "offloaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelCard:
    """What the API layer may know of the model: its name, its tasks, where it runs.

    Handed out by the engine so that no handler needs (or gets) the captioner itself.
    ``device`` and ``dtype`` are None while the model is not loaded.
    """

    model_id: str
    tasks: tuple[str, ...]
    device: str | None
    dtype: str | None


@dataclass(frozen=True)
class EngineStatus:
    """A point-in-time view of the engine for /v1/status, /health and metrics."""

    state: ModelState
    model: str
    device: str | None
    dtype: str | None
    loaded_since: float | None  # unix time
    expires_at: float | None  # unix time of the idle unload, None when busy or never
    keep_alive: float  # seconds the model stays loaded after the last batch (-1: until told otherwise)
    keep_alive_from: str  # "server" (--idle-timeout) or "request" (a request's keep_alive)
    queue_depth: int
    lane_depths: dict[str, int]  # jobs waiting per lane (interactive, bulk)
    jobs_running: int
    last_error: str | None
    draining: bool
    batches_run: int
    jobs_done: int
    last_batch_size: int
    mean_batch_size: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data
