"""``benchmarks/gallery_bench.py`` on a small folder as a test, so the benchmark cannot rot.

It checks that every figure is printed (and that the search found its one image), not how fast
anything is.
"""

from __future__ import annotations

from tests.support.bench_runs import run_bench

FIGURES = ("listing_s", "page_1_s", "page_middle_s", "search_cold_s", "search_warm_s", "thumbnail_made_s",
           "thumbnail_cached_s")  # fmt: skip


def test_gallery_bench_smoke() -> None:
    figures = run_bench("gallery_bench.py", "--images", "120", "--page-size", "10", timeout=300).figures
    assert figures["images"] == 120
    assert all(figures[name] >= 0 for name in FIGURES)
