"""The request bodies still arriving, so that a drain can cut them short.

A client uploading slowly when the server starts to drain would otherwise hold its connection,
and the process's exit, until ``--body-timeout`` or the close timeout ran out; its job would be
refused by the draining engine anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from vision_server.api.deadlines import Deadline


class Uploads:
    """The deadlines of the body reads in progress (each a :func:`~vision_server.api.deadlines.deadline`)."""

    def __init__(self) -> None:
        self._deadlines: set[Deadline] = set()
        self.cut = False

    @contextmanager
    def open(self, deadline: Deadline) -> Iterator[None]:
        """Count one body read for as long as it lasts."""
        self._deadlines.add(deadline)
        try:
            yield
        finally:
            self._deadlines.discard(deadline)

    def cut_short(self) -> int:
        """End every body read now (each raises its timeout) and refuse new ones; how many."""
        self.cut = True
        now = asyncio.get_running_loop().time()
        for deadline in self._deadlines:
            if not deadline.expired():  # one that just ran out ends as a timeout, cut all the same
                deadline.reschedule(now)
        return len(self._deadlines)

    def __len__(self) -> int:
        return len(self._deadlines)
