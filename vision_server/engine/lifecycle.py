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
    name: str = ""  # what requests pick it by ("" when built outside an engine)
    family: str = "florence-2"  # the architecture as clients see it (multipart's model_type)
    takes_prompt: bool = False  # free text reaches the model (BLIP, GIT, chat VLMs)
    source: str = ""  # hub id or directory it loads from
    adapter: str | None = None  # PEFT adapter directory on top, if any
    max_new_tokens: int | None = None  # the most tokens it can generate (None: no known limit)


@dataclass(frozen=True)
class EngineStatus:
    """A point-in-time view of the engine for /v1/status, /health and metrics."""

    state: ModelState
    model: str  # the default model's served name, as requests pick it (its source is under models)
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
    # Every served model (the default one included), in configured order.
    models: tuple[ModelStatus, ...] = ()
    memory_budget: int | None = None  # bytes, --memory-budget; None: no budget
    memory_used: int = 0  # bytes the loaded models' weights take, as far as they report it

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["models"] = [model.as_dict() for model in self.models]
        return data


@dataclass(frozen=True)
class ModelStatus:
    """One served model's part of /v1/status: its lifecycle, its memory and when it was last used."""

    name: str
    source: str
    adapter: str | None
    family: str
    default: bool
    state: ModelState
    device: str | None
    dtype: str | None
    # Its weights' size (estimated before its first load; 0 when unknown). None: not asked yet (the
    # engine asks every model off the event loop when it starts; that takes a moment when cold).
    memory_bytes: int | None
    last_used: float | None  # unix time its last batch ended
    loaded_since: float | None  # unix time
    expires_at: float | None  # unix time of its idle unload, None when busy or never
    idle_timeout: float
    queue_depth: int
    jobs_running: int
    waiting_for_memory: bool  # its jobs wait until busy models leave room under the budget
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data
