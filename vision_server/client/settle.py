"""Ending a run's own asyncio tasks before the run itself ends.

A run stopped early (an unexpected failure, Ctrl+C, SIGTERM) must not leave requests in flight
to ``asyncio.run``'s cleanup: by then the client's session is closed, so they fail or retry on a
new one, and asyncio prints "Task exception was never retrieved" for every failure nobody took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def settle(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel those of ``tasks`` still running and wait for all of them, taking every outcome."""
    for task in tasks:
        task.cancel()  # nothing for one already done
    await asyncio.gather(*tasks, return_exceptions=True)
