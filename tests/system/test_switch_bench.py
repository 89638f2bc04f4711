"""``benchmarks/switch_bench.py --smoke`` as a test, so the benchmark cannot rot (about 20 s).

Marked ``slow``. It checks what the server did (loads and evictions under each budget), which is
deterministic, not how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths

pytestmark = pytest.mark.slow


def test_two_models_alternated_switch_under_one_budget_and_stay_under_the_other(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    result = subprocess.run(
        [sys.executable, str(paths.BENCHMARKS / "switch_bench.py"), "--smoke", "--cache-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    one, both = figures["fits one"], figures["fits both"]
    # 4 timed requests after 2 cold ones: with room for one model, every request after the first
    # evicts the other model and loads its own; with room for both, only the two first loads.
    assert (one["loads"], one["evictions"]) == (6, 5)
    assert (both["loads"], both["evictions"]) == (2, 0)
    assert one["budget"] < sum(figures["model_bytes"]) <= both["budget"]
    assert "switch cost per request" in result.stdout
