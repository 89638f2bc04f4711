"""The engine's status snapshot (``/v1/status``, ``/metrics``, the systemd status line).

Built from the models' slots and the worker's counters, on the event loop and without touching a
model: the default model's fields at the top (the one-model shape clients know), every model's
lifecycle, memory and last use under ``models``, and the memory budget with what is used of it.
"""

from __future__ import annotations

from collections.abc import Mapping

from vision_server.engine.batches import BatchRunner
from vision_server.engine.jobs import Lane
from vision_server.engine.lifecycle import EngineStatus, ModelStatus
from vision_server.engine.room import MemoryRoom
from vision_server.engine.slots import ModelSlot
from vision_server.engine.timers import IdleTimers


def engine_status(
    slots: Mapping[str, ModelSlot],
    default: str,
    *,
    batches: BatchRunner,
    timers: IdleTimers,
    room: MemoryRoom,
    draining: bool,
) -> EngineStatus:
    """Where every model and the queues stand now; the top-level fields are ``default``'s."""
    chosen = slots[default]
    info = chosen.info
    models = slots.values()
    return EngineStatus(
        state=chosen.state,
        model=chosen.name,  # not its source: a hub id or a path names no model a client can ask for
        device=info.device if info else None,
        dtype=info.dtype if info else None,
        loaded_since=chosen.loaded_since,
        expires_at=timers.expires_at(chosen),
        keep_alive=chosen.keep_alive_now(),
        keep_alive_from="server" if chosen.keep_alive is None else "request",
        queue_depth=sum(slot.depth() for slot in models),
        lane_depths={lane.value: sum(slot.depth(lane) for slot in models) for lane in Lane},
        jobs_running=batches.running,
        last_error=chosen.last_error,
        draining=draining,
        batches_run=batches.batches,
        jobs_done=batches.jobs_done,
        last_batch_size=batches.last_batch_size,
        mean_batch_size=batches.mean_batch_size,
        models=tuple(model_status(slot, timers.expires_at(slot)) for slot in models),
        memory_budget=room.budget,
        memory_used=room.used(),
    )


def model_status(slot: ModelSlot, expires_at: float | None) -> ModelStatus:
    """One model's entry under ``models``."""
    card = slot.card()
    return ModelStatus(
        name=slot.name,
        source=slot.source,
        adapter=slot.adapter,
        family=card.family,
        default=slot.default,
        state=slot.state,
        device=card.device,
        dtype=card.dtype,
        memory_bytes=slot.memory_bytes(),
        last_used=slot.last_used,
        loaded_since=slot.loaded_since,
        expires_at=expires_at,
        idle_timeout=slot.idle_timeout,
        queue_depth=slot.depth(),
        jobs_running=slot.running,
        waiting_for_memory=slot.waiting_for_memory,
        last_error=slot.last_error,
    )
