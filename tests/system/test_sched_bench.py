"""``benchmarks/sched_bench.py --smoke`` as a test, so the benchmark cannot rot (about 30 s).

Marked ``slow``. It checks that every figure is printed, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths

BENCH = paths.BENCHMARKS / "sched_bench.py"

pytestmark = pytest.mark.slow


def run(what: str, tmp_path: Path) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    result = subprocess.run(
        [sys.executable, str(BENCH), what, "--smoke", "--cache-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_lanes_smoke(tmp_path: Path) -> None:
    figures = run("lanes", tmp_path)
    for phase in ("lanes", "fifo"):
        row = figures[phase]
        assert isinstance(row, dict) and row["probes"] >= 1 and row["p95_s"] > 0 and row["batch_s"] > 0


def test_tier_smoke(tmp_path: Path) -> None:
    figures = run("tier", tmp_path)
    assert figures["reload_s"] and (figures["wake_s"] is None) == (figures["device"] == "cpu")
