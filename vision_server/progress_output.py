"""How a long command shows progress on stderr: a tqdm bar on a terminal, plain lines in a log.

``vision-server caption`` and ``vision-server train`` both build on this, so the two look and
behave alike: messages go through the bar (so they do not tear it), and without a terminal a
status line is written at most every ``interval`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class ProgressOutput:
    """A tqdm bar when ``stream`` is a terminal (or ``bar`` says so), else timed plain lines."""

    def __init__(
        self, stream: IO[str] | None, interval: float, *, bar: bool | None = None, **tqdm_options: Any
    ) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._next_line = time.monotonic() + interval
        self._bar: Any = None
        if bar if bar is not None else self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(file=self.stream, dynamic_ncols=True, **tqdm_options)

    def line_due(self) -> bool:
        """Whether a plain status line is due now (never with a bar); a True schedules the next."""
        if self._bar is not None or time.monotonic() < self._next_line:
            return False
        self._next_line = time.monotonic() + self.interval
        return True

    def write(self, text: str) -> None:
        """One line of text, above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
