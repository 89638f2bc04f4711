"""A clock the engine's tests move by hand, instead of sleeping through timing windows."""

from __future__ import annotations

import asyncio


class FakeClock:
    """``now()`` stands still until :meth:`advance`; sleepers wake once it passes their time."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        entry = (deadline, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many coroutines wait on this clock now (the engine's worker, when it is idle).

        A sleeper already woken by :meth:`advance` but not yet run does not count.
        """
        return sum(not future.done() for _, future in self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time on, wake every sleeper that is due, and let them run."""
        self._now += seconds
        for due, future in list(self._sleepers):
            if due <= self._now and not future.done():
                future.set_result(None)
        await settle()


async def settle(turns: int = 20) -> None:
    """Let the event loop run what is ready (no real time passes for the engine's decisions)."""
    for _ in range(turns):
        await asyncio.sleep(0)
