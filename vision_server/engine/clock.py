"""The time the scheduler decides by: idle unloads, batch waits and request deadlines.

Production uses the monotonic clock; the engine's tests pass a clock they move by hand, so "the
model unloads after 300 idle seconds" is checked without waiting 300 seconds, or any.
Shutdown grace and the durations reported as metrics stay on real time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now()`` has reached ``deadline``.

        An absolute time rather than a duration: the worker decides when it must wake, and a
        timer that starts a little later (a busy loop, a slow test) still wakes it then.
        """
        ...


class MonotonicClock:
    """``time.monotonic`` and ``asyncio.sleep``: the engine's default."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
