"""When idle models step down and when freed memory is handed back, on the engine's clock.

A ready model steps down (to the warm tier, or unloaded) when its keep-alive (a request's, else its
idle timeout) has run out since its last batch; an offloaded one is freed after the offload
timeout; a trim follows a burst once the queue has stayed empty ``trim_after`` seconds. The worker
asks :meth:`IdleTimers.next_wake` how long it may sleep, and runs what is due when it wakes.
What a request's keep-alive may set is :func:`granted_keep_alive`'s rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from vision_server.engine.clock import Clock
from vision_server.engine.config import EngineConfig
from vision_server.engine.keeper import ModelKeeper
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.slots import ModelSlot
from vision_server.errors import BadRequest


class IdleTimers:
    """The idle step-down and trim deadlines of the engine's models."""

    def __init__(
        self, slots: Mapping[str, ModelSlot], keeper: ModelKeeper, clock: Clock, config: EngineConfig
    ) -> None:
        self.slots = slots
        self.keeper = keeper
        self.clock = clock
        self.config = config

    def next_wake(self) -> float | None:
        """When (on the clock) an idle model is due to step down or to trim, or None."""
        times = []
        for slot in self.slots.values():
            if len(slot.queue) or slot.busy_loading:
                continue
            unload_at = self.unload_at(slot)
            if unload_at is not None:
                times.append(unload_at)
            if slot.trim_pending:
                times.append(slot.last_finished + self.config.trim_after)
        return min(times, default=None)

    async def run(self, commands_waiting: Callable[[], bool]) -> None:
        """Step down every idle model whose time is up; trim after a burst that is over. A waiting
        admin command goes first: nothing more is started once one has come."""
        now = self.clock.now()
        for slot in self.slots.values():
            if len(slot.queue) or slot.busy_loading or commands_waiting():
                continue
            unload_at = self.unload_at(slot)
            if unload_at is not None and unload_at <= now:
                await self.keeper.step_down(slot)  # returns the memory itself
            elif slot.trim_pending and slot.last_finished + self.config.trim_after <= now:
                await self.keeper.trim_memory(slot)

    def unload_at(self, slot: ModelSlot) -> float | None:
        """When (on the clock) the model's next idle step down (offload or unload) is due, or None."""
        if slot.state is ModelState.OFFLOADED and slot.offloaded_at is not None:
            return slot.offloaded_at + self.config.offload_timeout
        keep_alive = slot.keep_alive_now()
        if slot.state is not ModelState.READY or keep_alive < 0:
            return None
        return slot.last_finished + keep_alive

    def expires_at(self, slot: ModelSlot) -> float | None:
        """The unix time of the model's next idle step down; None while it has work or none is due."""
        unload_at = self.unload_at(slot)
        if unload_at is None or slot.running or len(slot.queue):
            return None
        return time.time() + max(0.0, unload_at - self.clock.now())


def granted_keep_alive(seconds: float, cap: float) -> float:
    """What a request asking for ``seconds`` of keep-alive gets under ``cap`` (negative: no cap).

    "Forever" (negative) is refused with a 400 when there is a cap, so one client cannot pin
    the model for everyone; a finite wish above the cap is granted the cap.
    """
    if cap < 0:
        return seconds
    if seconds < 0:
        raise BadRequest(
            f"keep_alive {seconds:g} (keep the model loaded indefinitely) is not allowed: this "
            f"server caps keep-alive at {cap:g} s (--max-keep-alive). Ask for {cap:g} s or less."
        )
    return min(seconds, cap)
