"""Admin messages to the worker: load, unload or offload a model now, and stop.

Only the worker touches the models, so an admin action (or the shutdown) is a message queued here
and run by the worker between batches: an unload can never hit a running batch. The caller waits
on a future the worker settles (an admin load: when the load it started ends).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Literal

from vision_server.engine.keeper import LOAD_RETRY_AFTER, ModelKeeper
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.room import MemoryRoom
from vision_server.engine.slots import ModelSlot
from vision_server.errors import BadRequest, ModelLoadError, VisionServerError

Command = Literal["load", "unload", "offload", "stop"]


class AdminCommands:
    """The waiting messages, and what the worker does for each."""

    def __init__(
        self, slots: Mapping[str, ModelSlot], keeper: ModelKeeper, room: MemoryRoom, wakeup: asyncio.Event
    ) -> None:
        self.slots = slots
        self.keeper = keeper
        self.room = room
        self.wakeup = wakeup
        self._waiting: deque[tuple[Command, ModelSlot, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    async def send(self, command: Command, slot: ModelSlot) -> None:
        """Queue ``command`` for the worker and wait until it has been carried out."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((command, slot, done))
        self.wakeup.set()
        await done

    def fail_all(self, error: Callable[[], VisionServerError]) -> None:
        """Answer every waiting message with ``error()`` (the worker died)."""
        while self._waiting:
            _, _, done = self._waiting.popleft()
            if not done.done():
                done.set_exception(error())

    async def handle_next(self) -> bool:
        """Run the oldest message; True when the worker should exit."""
        command, slot, done = self._waiting.popleft()
        try:
            if command == "load":
                await self._load(slot, done)
                return False
            if command == "offload":
                await self._offload(slot)
            elif command == "unload":
                await self.keeper.finish_load(slot)
                await self.keeper.unload(slot, "admin")
            else:
                for each in self.slots.values():
                    await self.keeper.finish_load(each)
                    await self.keeper.unload(each, "shutdown")
        except VisionServerError as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)
        return command == "stop"

    async def _load(self, slot: ModelSlot, done: asyncio.Future[None]) -> None:
        """Start loading ``slot`` (making room under the budget); ``done`` settles when it ends."""
        if slot.state is ModelState.READY:
            done.set_result(None)
            return
        if not slot.busy_loading:
            await self.keeper.sized(slot)
            await self.room.make_room(slot, for_admin=True)
            self.keeper.begin_load(slot)
        assert slot.loading is not None
        slot.loading.add_done_callback(lambda task: self._settle_load(slot, task, done))

    def _settle_load(self, slot: ModelSlot, task: asyncio.Task[bool], done: asyncio.Future[None]) -> None:
        if done.done():
            return
        if not task.cancelled() and task.exception() is None and task.result():
            done.set_result(None)
        else:
            done.set_exception(
                ModelLoadError(self.keeper.load_error_message(slot), retry_after=LOAD_RETRY_AFTER)
            )

    async def _offload(self, slot: ModelSlot) -> None:
        await self.keeper.finish_load(slot)
        if slot.state is not ModelState.READY:
            return  # nothing loaded to move (or already offloaded)
        if not self.keeper.tier_available(slot):
            raise BadRequest(
                "This server has no warm tier: the model runs on the CPU, or --offload-timeout is 0. "
                "Use /v1/model/unload to free the memory."
            )
        await self.keeper.offload(slot, "admin")
