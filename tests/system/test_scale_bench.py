"""``benchmarks/scale_bench.py --smoke`` as a test, so the benchmark cannot rot (about 30 s: two
``vision-server caption`` start-ups, the clients against a stand-in server, two on a terminal).

It checks that every figure is there (the script itself checks each tool's counts of captioned,
skipped and listed images), not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import paths

BENCH = paths.BENCHMARKS / "scale_bench.py"
RUNS = ("caption_dry_fresh", "client_dry_fresh", "caption_dry_files", "caption_resume", "client_resume",
        "bash_resume", "client_resume_tty", "bash_resume_tty")  # fmt: skip


def test_scale_bench_smoke(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    (run,) = figures["results"]
    assert (run["images"], run["missing"]) == (40, 3)
    for name in RUNS:
        assert run[name]["wall_s"] > 0 and run[name]["cpu_s"] > 0 and run[name]["peak_pss_mib"] > 0, name
    assert "caption_resume_tty" not in run and "caption_dry_resumed" not in run
    for label in ("vision-server caption, resume", "vision-caption-folder-images.sh, resume, terminal"):
        assert label in result.stdout
    assert not (tmp_path / "tree-40").exists()  # the tree is deleted after its count
