"""When to try a request again and how long to wait first.

A busy server says how long to wait (``Retry-After`` on 503/429); we wait at least that long,
plus a little jitter so a folder run's parallel requests do not all come back in the same
instant. Without a hint we back off exponentially with jitter. Only answers that mean "not now"
are retried: a 4xx will fail the same way again, and a 504 already used up the server's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({429, 502, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and how the wait grows between attempts."""

    retries: int = 5  # attempts after the first one
    base_delay: float = 0.5  # seconds before the first retry when the server gives no hint
    max_delay: float = 30.0  # cap for exponential back-off
    max_retry_after: float = 120.0  # never sleep longer than this, whatever the server says

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0 for the first retry)."""
        if retry_after is not None:
            wait = min(retry_after, self.max_retry_after)
            return wait + random.uniform(0, 0.1 * wait + 0.05)
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(backoff / 2, backoff)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header, in seconds or as an HTTP date; ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())
