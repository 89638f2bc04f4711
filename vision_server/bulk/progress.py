"""What the user sees: a progress bar on a terminal, plain periodic lines in logs, a summary.

Everything goes to stderr; stdout carries only what ``--dry-run`` lists. Each failure is
printed as it happens with its path and reason, so nothing depends on reading the summary.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import IO

from vision_server.bulk.pipeline import Outcome, Summary
from vision_server.disk_full import RERUN_ADVICE
from vision_server.progress_output import ProgressOutput


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(ProgressOutput):
    """A tqdm bar when ``stream`` is a terminal, else a line every ``interval`` seconds."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        interval: float = 10.0,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(stream, interval, bar=bar, unit="img", smoothing=0.05)
        self.total: int | None = None
        self._clock = clock
        self._first_caption: tuple[float, int] | None = None  # when, and the count then

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def report(self, summary: Summary, outcome: Outcome, display: str, reason: str | None) -> None:
        if outcome == "captioned" and self._first_caption is None:
            self._first_caption = (self._clock(), summary.captioned)
        if outcome == "failed":
            self.write(f"failed: {display}: {reason}")
        if self._bar is not None:
            self._bar.update(1)
            if outcome == "failed":
                self._bar.set_postfix(failed=summary.failed, refresh=False)
        elif self.line_due():
            self.write(self.line(summary))

    def line(self, summary: Summary) -> str:
        """``1200/5000 images (captioned 1180, skipped 12, failed 8), 9.8 img/s, ETA 6:28``."""
        rate = self._rate(summary)
        of = f"/{self.total}" if self.total is not None else ""
        text = (
            f"{summary.processed}{of} images (captioned {summary.captioned}, skipped {summary.skipped}, "
            f"failed {summary.failed})"
        )
        if rate is not None:
            text += f", {rate:.1f} img/s"
            if self.total is not None and rate > 0:
                text += f", ETA {_duration(max(0, self.total - summary.processed) / rate)}"
        return text

    def _rate(self, summary: Summary) -> float | None:
        """Captions per second since the first one; None (no rate, no ETA) until a second. The
        start-up (imports, the model's load) and, on a resume, the skipping of what is done come
        before it and say nothing of the pace ahead: counted in, the first line's ETA was several
        times too long (1 caption 10 s in said "0.1 img/s" of a model doing 3)."""
        if self._first_caption is None:
            return None
        at, count = self._first_caption
        now = self._clock()
        if summary.captioned <= count or now <= at:
            return None
        return (summary.captioned - count) / (now - at)


def format_summary(summary: Summary) -> str:
    seconds = summary.seconds or (time.monotonic() - summary.started)
    rate = summary.captioned / seconds if seconds > 0 else 0.0
    lines = []
    if summary.interrupted is not None:
        name = signal.Signals(summary.interrupted).name
        lines.append(f"interrupted by {name}: stopped cleanly; run the same command again to resume")
    lines.append(
        f"captioned {summary.captioned}, skipped {summary.skipped}, failed {summary.failed} "
        f"in {_duration(seconds)} ({rate:.2f} img/s)"
    )
    if summary.failed:
        lines.append("failed:")
        lines.extend(f"  {display}: {reason}" for display, reason in summary.failures)
        if summary.failed > len(summary.failures):
            lines.append(f"  ... and {summary.failed - len(summary.failures)} more (each printed above)")
    if summary.stopped is not None:
        lines.append(f"stopped early: {summary.stopped}")
        lines.append(f"everything written so far is whole; {RERUN_ADVICE}")
    return "\n".join(lines)


def format_load_failure(summary: Summary, error: str, total: int | None) -> str:
    """After the summary of a run the model's load stopped: why (``error``, the cause), and that
    a rerun goes on."""
    again = "run the same command again once the model loads (what is done is skipped)"
    if total is None:
        left = f"the images not captioned yet are captioned when you {again}"
    else:
        count = max(0, total - summary.processed)
        verb = "is" if count == 1 else "are"
        left = f"{count} of the {total} images {verb} not captioned yet: {again}"
    return f"error: the model could not be loaded: {error}\n{left}"
