"""One served model inside the engine: its captioner, its queue and its lifecycle.

The engine keeps one :class:`ModelSlot` per name. Everything here is plain state read and written
by the engine's worker coroutine; the slot itself never runs the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from vision_server.captioner import Captioner, ModelInfo, model_family, token_limit
from vision_server.engine.budget import memory_parts
from vision_server.engine.jobs import Lane
from vision_server.engine.lifecycle import ModelCard, ModelState
from vision_server.engine.models import NamedModel
from vision_server.engine.queue import JobQueue
from vision_server.errors import UnknownModel

# States in which a model's weights take device memory (a load or an unload in progress included).
RESIDENT = (ModelState.LOADING, ModelState.READY, ModelState.UNLOADING)


class ModelSlot:
    """A named model's captioner, its own two-lane queue, and where it is in its lifecycle."""

    def __init__(
        self, model: NamedModel, queue: JobQueue, *, idle_timeout: float, default: bool, now: float
    ) -> None:
        self.name = model.name
        self.captioner: Captioner = model.captioner
        self.source = model.shown_source
        self.adapter = model.adapter
        self.idle_timeout = idle_timeout
        self.default = default
        self.queue = queue
        self.state = ModelState.UNLOADED
        self.info: ModelInfo | None = None
        self.loaded_since: float | None = None  # unix time
        self.last_error: str | None = None
        self.last_finished = now  # on the engine's clock: the end of its last batch, load or wake
        self.last_used: float | None = None  # unix time its last batch ended
        self.keep_alive: float | None = None  # a request's keep-alive in force (None: idle_timeout)
        self.offloaded_at: float | None = None  # on the clock, while in the warm tier
        self.trim_pending = False  # a batch ran since the last trim (or unload)
        self.running = 0  # jobs of its batch in the model thread now
        self.loading: asyncio.Task[bool] | None = None  # its load (or wake) in progress
        self.loading_since: float | None = None  # on the clock, while its state is LOADING
        self.waiting_for_memory = False  # its jobs wait for busy models to leave room
        # Its first memory answer, asked off the event loop (ModelKeeper.begin_sizing): until it
        # is in, memory_parts() is empty and memory_bytes() None (not yet known).
        self.sizing: asyncio.Task[None] | None = None
        self.sized = False
        self.size_failed = False  # the captioner raised when asked: unknown for good

    @property
    def busy_loading(self) -> bool:
        return self.loading is not None and not self.loading.done()

    @property
    def needs_load(self) -> bool:
        """Live jobs wait (not only ones whose client left) and the model is not ready nor on its way."""
        return self.holds_jobs_before(None) and self.state is not ModelState.READY and not self.busy_loading

    def holds_jobs_before(self, since: float | None) -> bool:
        """Whether one of its waiting jobs was queued at or before ``since`` (None: any job).

        The one rule of turns under the memory budget: a model holding jobs older than a waiting
        model's oldest is busy (never evicted, still served); one whose jobs all came later yields.
        """
        oldest = self.queue.oldest()
        return oldest is not None and (since is None or oldest <= since)

    def keep_alive_now(self) -> float:
        """Seconds it stays loaded after its last batch: a request's wish, else its idle timeout."""
        return self.idle_timeout if self.keep_alive is None else self.keep_alive

    def memory_parts(self) -> dict[str, int]:
        """Its weights' bytes per block; empty while unknown. Never asks the captioner before its
        first answer is in (that one may take seconds, and this runs on the event loop)."""
        if not self.sized or self.size_failed:
            return {}
        return memory_parts(self.captioner)

    def memory_bytes(self) -> int | None:
        """Its weights' bytes: None until the engine has asked (just after it starts)."""
        return sum(self.memory_parts().values()) if self.sized else None

    def card(self) -> ModelCard:
        info = self.info
        return ModelCard(
            model_id=self.captioner.model_id,
            tasks=self.captioner.tasks,
            device=info.device if info else None,
            dtype=info.dtype if info else None,
            name=self.name,
            family=model_family(self.captioner),
            takes_prompt=self.captioner.takes_prompt,
            source=self.source,
            adapter=self.adapter,
            max_new_tokens=token_limit(self.captioner),
        )

    def depth(self, lane: Lane | None = None) -> int:
        return len(self.queue) if lane is None else self.queue.depth(lane)


def resolve_name(slots: Mapping[str, ModelSlot], default: str, name: str | None) -> str:
    """The served name a request's ``model`` means: None or "" is the default model; a model's
    source (hub id or directory) names it too when no other model has that source."""
    if not name:
        return default
    if name in slots:
        return name
    by_source = [slot.name for slot in slots.values() if slot.source == name]
    if len(by_source) == 1:
        return by_source[0]
    served = f"Served: {', '.join(slots)} (default {default}); omit the model to get the default."
    if by_source:  # two adapters on one base model, say: "not served" would send the user astray
        raise UnknownModel(
            f"{_quoted(name)} is the source of several served models ({', '.join(by_source)}): "
            f"name one of them. {served}"
        )
    raise UnknownModel(f"This server does not serve a model named {_quoted(name)}. {served}")


def _quoted(name: str, limit: int = 80) -> str:
    """``name`` as a refusal quotes it: whole when short, else its two ends and its length (a
    client may send megabytes, and the whole name came back in the 404)."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[: limit - 20]!r}...{name[-16:]!r} ({len(name)} characters)"


def model_key(slot: ModelSlot) -> dict[str, str]:
    """``extra=`` for a log line about one model: in JSON logs ``model`` is a key to search by."""
    return {"model": slot.name}
