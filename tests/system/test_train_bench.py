"""``benchmarks/train_bench.py --smoke`` as a test, so the benchmark cannot rot (tiny model, a few
steps). Marked ``slow``; it checks that every figure is printed, not how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths

pytestmark = pytest.mark.slow


def test_train_bench_smoke(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        str(paths.BENCHMARKS / "train_bench.py"),
        "--smoke",
        "--workdir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    (row,) = figures["results"]
    assert row["name"] == "tiny cpu fp32" and row["timed_steps"] == 2
    assert row["steps_per_s"] > 0 and row["peak_rss_mib"] > 0 and row["peak_gpu_mib"] is None
    assert "tiny cpu fp32" in result.stdout.splitlines()[1]
