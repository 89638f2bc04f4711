"""Run a benchmark script as the smoke tests do: a fresh interpreter, none of the caller's
``VISION_*`` settings, exit 0 required, the figures read from its last line of output (JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import paths


@dataclass(frozen=True)
class BenchRun:
    """What one run printed: its figures (the last line) and all of its standard output."""

    figures: dict[str, Any]
    stdout: str


def run_bench(script: str, *args: str | Path, timeout: float, env: dict[str, str] | None = None) -> BenchRun:
    """``benchmarks/<script> ARGS`` to its end (``env`` adds variables); it must exit 0, and the
    test reads its stdout and stderr when it does not."""
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, str(paths.BENCHMARKS / script), *map(str, args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return BenchRun(dict(json.loads(result.stdout.strip().splitlines()[-1])), result.stdout)
