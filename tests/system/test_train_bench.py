"""``benchmarks/train_bench.py --smoke`` as a test, so the benchmark cannot rot (tiny model, a few
steps). Marked ``slow``; it checks that every figure is printed, not how fast anything is."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_runs import run_bench

pytestmark = pytest.mark.slow


def test_train_bench_smoke(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1"}
    result = run_bench("train_bench.py", "--smoke", "--workdir", tmp_path, timeout=600, env=env)
    (row,) = result.figures["results"]
    assert row["name"] == "tiny cpu fp32" and row["timed_steps"] == 2
    assert row["steps_per_s"] > 0 and row["peak_rss_mib"] > 0 and row["peak_gpu_mib"] is None
    assert "tiny cpu fp32" in result.stdout.splitlines()[1]
