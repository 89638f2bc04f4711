"""``benchmarks/sched_bench.py --smoke`` as a test, so the benchmark cannot rot (about 30 s).

Marked ``slow``. It checks that every figure is printed, not how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_runs import run_bench

pytestmark = pytest.mark.slow


def run(what: str, tmp_path: Path) -> dict[str, object]:
    return run_bench("sched_bench.py", what, "--smoke", "--cache-dir", tmp_path, timeout=600).figures


def test_lanes_smoke(tmp_path: Path) -> None:
    figures = run("lanes", tmp_path)
    for phase in ("lanes", "fifo"):
        row = figures[phase]
        assert isinstance(row, dict) and row["probes"] >= 1 and row["p95_s"] > 0 and row["batch_s"] > 0


def test_tier_smoke(tmp_path: Path) -> None:
    figures = run("tier", tmp_path)
    assert figures["reload_s"] and (figures["wake_s"] is None) == (figures["device"] == "cpu")
