"""``benchmarks/switch_bench.py --smoke`` as a test, so the benchmark cannot rot (about 20 s).

Marked ``slow``. It checks what the server did (loads and evictions under each budget), which is
deterministic, not how fast anything was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_runs import run_bench

pytestmark = pytest.mark.slow


def test_two_models_alternated_switch_under_one_budget_and_stay_under_the_other(tmp_path: Path) -> None:
    result = run_bench("switch_bench.py", "--smoke", "--cache-dir", tmp_path, timeout=600)
    figures = result.figures
    one, both = figures["fits one"], figures["fits both"]
    # 4 timed requests after 2 cold ones: with room for one model, every request after the first
    # evicts the other model and loads its own; with room for both, only the two first loads.
    assert (one["loads"], one["evictions"]) == (6, 5)
    assert (both["loads"], both["evictions"]) == (2, 0)
    assert one["budget"] < sum(figures["model_bytes"]) <= both["budget"]
    assert "switch cost per request" in result.stdout
