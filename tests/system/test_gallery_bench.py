"""``benchmarks/gallery_bench.py`` on a small folder as a test, so the benchmark cannot rot.

It checks that every figure is printed (and that the search found its one image), not how fast
anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import paths

BENCH = paths.BENCHMARKS / "gallery_bench.py"
FIGURES = ("listing_s", "page_1_s", "page_middle_s", "search_cold_s", "search_warm_s", "thumbnail_made_s",
           "thumbnail_cached_s")  # fmt: skip


def test_gallery_bench_smoke() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--images", "120", "--page-size", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["images"] == 120
    assert all(figures[name] >= 0 for name in FIGURES)
