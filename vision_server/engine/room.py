"""Room under ``--memory-budget``: which idle models to unload before a load, and when to wait.

The rule: before a load that would pass the budget, idle models are unloaded least recently used
first; a model with a running batch, a load in progress, or jobs older than the waiting model's
oldest is never evicted (it finishes those first); a model that cannot fit even alone is refused.
The arithmetic is :mod:`vision_server.engine.budget`'s; this applies it to the engine's models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vision_server.byte_sizes import format_byte_size
from vision_server.engine.budget import Resident, footprint, plan_evictions
from vision_server.engine.jobs import fail
from vision_server.engine.keeper import LOAD_RETRY_AFTER, ModelKeeper
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.slots import RESIDENT, ModelSlot, model_key
from vision_server.errors import ModelTooLarge, ServiceUnavailable

log = logging.getLogger("vision_server.engine.scheduler")


class MemoryRoom:
    """Makes room for a model under the budget (None: no budget, always room)."""

    def __init__(self, budget: int | None, slots: Mapping[str, ModelSlot], keeper: ModelKeeper) -> None:
        self.budget = budget
        self.slots = slots
        self.keeper = keeper

    def used(self) -> int:
        """Bytes the resident models' weights take, a shared block counted once."""
        return footprint(model.parts for model in self.resident())

    def resident(self) -> list[Resident]:
        """The models whose weights are in memory (or on their way in or out)."""
        return [
            Resident(slot.name, slot.memory_parts()) for slot in self.slots.values() if slot.state in RESIDENT
        ]

    def idle_by_last_use(self, since: float | None) -> list[str]:
        """The models that may be evicted, least recently used first: loaded, not running nor
        loading, and holding no job queued at or before ``since`` (None: no job at all)."""
        idle = [
            slot
            for slot in self.slots.values()
            if slot.state is ModelState.READY
            and not slot.running
            and not slot.busy_loading
            and not slot.holds_jobs_before(since)
        ]
        return [slot.name for slot in sorted(idle, key=lambda slot: slot.last_finished)]

    async def make_room(self, slot: ModelSlot, *, for_admin: bool = False) -> bool:
        """Unload idle models (least recently used first) until ``slot`` fits the budget.

        False when it cannot fit yet (busy models hold the rest: it waits). A model that cannot
        fit even alone has its jobs refused with :class:`ModelTooLarge` (also False). An admin
        load raises instead of waiting.
        """
        budget = self.budget
        if budget is None:
            return True
        wanted = slot.memory_parts()
        if sum(wanted.values()) > budget:
            error = self.too_large(slot, wanted, budget)
            if for_admin:
                raise error
            for job in slot.queue.take_all():
                fail(job, error)
            slot.waiting_for_memory = False
            return False
        resident = self.resident()  # never ``slot`` itself: it is not loaded
        victims = plan_evictions(wanted, resident, self.idle_by_last_use(slot.queue.oldest()), budget)
        if victims is None:
            if for_admin:
                used = footprint(model.parts for model in resident)
                raise ServiceUnavailable(
                    f"Model {slot.name!r} needs {format_byte_size(sum(wanted.values()))} and models that are "
                    f"busy hold {format_byte_size(used)} of the {format_byte_size(budget)} memory budget; "
                    "retry when they are idle.",
                    retry_after=LOAD_RETRY_AFTER,
                )
            if not slot.waiting_for_memory:
                log.info(
                    "model %s waits for memory: busy models hold the budget", slot.name, extra=model_key(slot)
                )
            slot.waiting_for_memory = True
            return False
        for name in victims:
            await self.evict(name, f"to make room for {slot.name} (--memory-budget)")
        return True

    async def enforce(self) -> None:
        """After a load measured more than estimated: unload idle models until the sum fits again."""
        budget = self.budget
        if budget is None:
            return
        resident = self.resident()
        if footprint(model.parts for model in resident) <= budget:
            return
        for name in plan_evictions({}, resident, self.idle_by_last_use(None), budget) or []:
            await self.evict(name, "as the loaded models measure more than --memory-budget")

    async def evict(self, name: str, why: str) -> None:
        """Unload the idle model ``name`` for the budget, with a log line that says why."""
        victim = self.slots[name]
        log.info("unloading idle model %s %s", name, why, extra=model_key(victim))
        await self.keeper.unload(victim, "evicted")

    def too_large(self, slot: ModelSlot, wanted: dict[str, int], budget: int) -> ModelTooLarge:
        need = sum(wanted.values())
        slot.last_error = (
            f"Model {slot.name!r} needs about {format_byte_size(need)} ({need} bytes) for its weights, "
            f"more than the whole --memory-budget of {format_byte_size(budget)} ({budget} bytes). Raise "
            "the budget, or serve it in a smaller dtype."
        )
        log.error("%s", slot.last_error, extra=model_key(slot))
        return ModelTooLarge(slot.last_error)
