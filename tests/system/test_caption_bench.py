"""``benchmarks/caption_bench.py --smoke`` as a test, so the benchmark cannot rot (about 2 minutes:
the local path, the model alone, a ``--ray`` run on a local runtime and four RSS runs).

Marked ``slow``: leave it out with ``pytest -m "not slow"``. It checks that every figure is
printed, not how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_runs import run_bench

pytestmark = pytest.mark.slow


def test_caption_bench_smoke(tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    result = run_bench("caption_bench.py", "--smoke", "--workdir", tmp_path, timeout=900)
    figures = result.figures
    assert figures["caption"]["captioned"] == figures["images"] == 24
    assert figures["ray"]["captioned"] == 24
    assert figures["caption"]["bursts"] >= 3, figures["caption"]  # else no steady rate, no ratio
    assert figures["model_img_s"] > 0
    assert set(figures["peak_rss_mib"]) == {"small_6", "small_24", "large_1", "large_4"}
    assert all(mib > 0 for mib in figures["peak_rss_mib"].values())
    for line in ("ratio caption / model", "caption --ray (local Ray)", "peak RSS"):
        assert line in result.stdout
