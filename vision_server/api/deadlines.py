"""A deadline over a block of code in the current task that another task may move.

A body read runs under one in the handler's own task: a ``wait_for`` task around it kept the
body's frames alive (RSS grew ~130 MiB over 200 rejected bodies), and the drain moves every
deadline to now to cut slow uploads short (:mod:`vision_server.api.uploads`). That is
``asyncio.timeout`` from Python 3.11 on; on 3.10 a stand-in with the part of its API used here.
"""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    from asyncio import Timeout as Deadline
    from asyncio import timeout as deadline
else:  # pragma: no cover - exercised on Python 3.10 only
    from types import TracebackType
    from typing import Any

    class Deadline:
        """``asyncio.Timeout``'s ``when``/``reschedule``/``expired`` on Python 3.10.

        At the deadline the task is cancelled, and the block raises ``asyncio.TimeoutError``
        instead. Python 3.10 cannot count a task's cancellations (3.11's ``uncancel``), so a
        cancellation from elsewhere that arrives after the deadline fired ends as a timeout too.
        """

        def __init__(self, when: float | None) -> None:
            self._when = when
            self._task: asyncio.Task[Any] | None = None
            self._timer: asyncio.TimerHandle | None = None
            self._fired = False

        async def __aenter__(self) -> Deadline:
            self._task = asyncio.current_task()
            if self._task is None:
                raise RuntimeError("a deadline must be entered in a task")
            self.reschedule(self._when)
            return self

        async def __aexit__(
            self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None
        ) -> None:
            self._stop_timer()
            self._task = None
            if self._fired and kind is asyncio.CancelledError:
                raise asyncio.TimeoutError from error

        def when(self) -> float | None:
            return self._when

        def expired(self) -> bool:
            return self._fired

        def reschedule(self, when: float | None) -> None:
            """Move the deadline (``None``: none); from any task of the loop, unlike async-timeout's
            ``update``, which would cancel the task that calls it."""
            if self._fired:
                raise RuntimeError("Cannot change state of an expired deadline")
            self._when = when
            self._stop_timer()
            if when is not None and self._task is not None:
                self._timer = asyncio.get_running_loop().call_at(when, self._fire)

        def _fire(self) -> None:
            self._timer = None
            self._fired = True
            if self._task is not None:
                self._task.cancel()

        def _stop_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def deadline(delay: float | None) -> Deadline:
        """Like ``asyncio.timeout``: ``delay`` seconds from now, or none."""
        return Deadline(None if delay is None else asyncio.get_running_loop().time() + delay)


__all__ = ["Deadline", "deadline"]
