"""Whose turn it is: which waiting model's load starts, and which ready model's batch runs next.

Models take turns batch by batch (round robin after the one served last), so a busy model never
starves another. Loads start one at a time, for the model whose oldest job is oldest, once its
size is known and room is made under the memory budget (:mod:`vision_server.engine.room`). The
one rule under the budget (:meth:`~vision_server.engine.slots.ModelSlot.holds_jobs_before`): a
model that stands between a waiting model and its memory finishes only the jobs it had before
that model's, then yields.
"""

from __future__ import annotations

from collections.abc import Mapping

from vision_server.engine.keeper import ModelKeeper
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.room import MemoryRoom
from vision_server.engine.slots import ModelSlot


class Turns:
    """Picks the worker's next load and next batch among the engine's models."""

    def __init__(self, slots: Mapping[str, ModelSlot], room: MemoryRoom, keeper: ModelKeeper) -> None:
        self.slots = slots
        self.room = room
        self.keeper = keeper
        self.served_last: str | None = None  # the model whose batch ran last (round robin)

    def next_to_serve(self) -> ModelSlot | None:
        """The next ready model with waiting jobs, in turn after the one served last.

        Models take turns batch by batch, so a busy model never starves another. A model that
        stands between a waiting model and the memory it needs is not served jobs that came after
        the waiting one's (:meth:`ModelSlot.holds_jobs_before`): it finishes its older jobs, then
        makes room.
        """
        slots = list(self.slots.values())
        last = self.served_last
        if last is not None and last in self.slots:
            start = list(self.slots).index(last) + 1
            slots = slots[start:] + slots[:start]
        waiting = self._memory_waiter_since()
        for slot in slots:
            if slot.state is not ModelState.READY or not len(slot.queue):
                continue
            if waiting is None or slot.holds_jobs_before(waiting):
                return slot
        return None

    def _memory_waiter_since(self) -> float | None:
        """When the oldest job of a model waiting for memory was queued (None: nobody waits)."""
        times = [slot.queue.oldest() for slot in self.slots.values() if slot.waiting_for_memory]
        return min((t for t in times if t is not None), default=None)

    async def start_loads(self) -> None:
        """Start the load that waiting jobs need (oldest job first), making room first.

        One load at a time; a model whose jobs cannot get room yet waits (``waiting_for_memory``)
        until busy models finish the jobs they had before it. A model whose size is not known yet
        (asked off the event loop when the engine starts) is sized first.
        """
        await self.room.enforce()
        if any(slot.busy_loading for slot in self.slots.values()):
            return
        pending = []
        for slot in self.slots.values():
            if slot.needs_load:
                pending.append(slot)
            else:
                slot.waiting_for_memory = False
        pending.sort(key=lambda slot: slot.queue.oldest() or 0.0)
        for slot in pending:
            if not slot.sized:  # its size decides whether and where it loads: ask, look again then
                self.keeper.begin_sizing(slot)
                return
            if await self.room.make_room(slot):
                slot.waiting_for_memory = False
                self.keeper.begin_load(slot)
                return
