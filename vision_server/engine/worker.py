"""The worker coroutine's turns: the one place that decides what happens to the models next.

Each turn does one thing: an admin message, the loads waiting jobs need, one model's batch, or a
wait until something is queued, a load ends, a message comes or a timer is due (then the idle
step-downs and trims). A bug between batches fails the jobs in hand and the loop carries on;
:class:`~vision_server.engine.scheduler.Engine` starts it, restarts it should it die, and stops it.
"""

from __future__ import annotations

import asyncio
import logging

from vision_server.engine.batches import BatchRunner
from vision_server.engine.clock import Clock
from vision_server.engine.commands import AdminCommands
from vision_server.engine.timers import IdleTimers
from vision_server.engine.turns import Turns
from vision_server.errors import CaptionFailed

log = logging.getLogger("vision_server.engine.scheduler")


class WorkerLoop:
    """What the worker coroutine runs: turn after turn until a stop message."""

    def __init__(
        self,
        commands: AdminCommands,
        turns: Turns,
        batches: BatchRunner,
        timers: IdleTimers,
        clock: Clock,
        wakeup: asyncio.Event,
    ) -> None:
        self.commands = commands
        self.turns = turns
        self.batches = batches
        self.timers = timers
        self.clock = clock
        # Set on every queued job, finished load and command: the worker's one reason to look again.
        self.wakeup = wakeup

    async def run(self) -> None:
        while True:
            try:
                if await self.step():
                    return
            except Exception:  # a bug between batches must not end captioning for good
                log.exception("the worker hit an unexpected error; its current jobs fail, it carries on")
                self.batches.abandon(
                    self.turns.slots.values(), lambda: CaptionFailed("Captioning failed; see the server log.")
                )
                await asyncio.sleep(0.1)  # no tight loop should the error repeat

    async def step(self) -> bool:
        """One turn of the worker: a command, loads to start, a batch, or a wait for something to
        do (a job, a finished load, an idle unload, a trim). True when it should exit."""
        self.wakeup.clear()  # what happens from here on wakes the wait at the end of this turn
        if self.commands.waiting:
            return await self.commands.handle_next()
        await self.turns.start_loads()
        slot = self.turns.next_to_serve()
        if slot is not None:
            batch = await self.batches.collect(slot)
            if batch:
                self.turns.served_last = slot.name
                await self.batches.run(slot, batch)
            return False
        await self._wait_for_work()
        await self.timers.run(lambda: self.commands.waiting)
        return False

    async def _wait_for_work(self) -> None:
        """Sleep until something is queued, a load ends, a command comes, or a timer is due."""
        if self.wakeup.is_set():
            return
        wake_at = self.timers.next_wake()
        if wake_at is None:
            await self.wakeup.wait()
            return
        woken = asyncio.ensure_future(self.wakeup.wait())
        timer = asyncio.ensure_future(self.clock.sleep_until(wake_at))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()
