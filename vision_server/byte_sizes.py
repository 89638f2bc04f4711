"""Amounts of memory as people write them: ``24GiB``, ``8G``, ``512MB``, ``1.5GiB``, ``1000000``.

K, M, G, T (with or without B) are powers of 1000; KiB, MiB, GiB, TiB (or Ki, Mi ...) are powers
of 1024, as the SI and IEC prefixes mean. Case does not matter; a bare number is bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
EXAMPLES = "24GiB, 8G, 512MB, 1.5GiB or 1000000 (bytes)"


def parse_byte_size(text: str) -> int:
    """The number of bytes ``text`` means (fractions of a byte are dropped); ValueError when none."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; write it like {EXAMPLES}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise ValueError(f"{text!r} is not a size; write it like {EXAMPLES}") from None
    unit = (match.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    return int(number * base ** _POWERS[unit.rstrip("i")])


def format_byte_size(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps at least 1 (``1.5 GiB``), for messages."""
    value, unit = float(count), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
