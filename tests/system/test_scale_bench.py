"""``benchmarks/scale_bench.py --smoke`` as a test, so the benchmark cannot rot (about 30 s: two
``vision-server caption`` start-ups, the clients against a stand-in server, two on a terminal).

It checks that every figure is there (the script itself checks each tool's counts of captioned,
skipped and listed images), not how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.bench_runs import run_bench

RUNS = ("caption_dry_fresh", "client_dry_fresh", "caption_dry_files", "caption_resume", "client_resume",
        "bash_resume", "client_resume_tty", "bash_resume_tty")  # fmt: skip


def test_scale_bench_smoke(tmp_path: Path) -> None:
    result = run_bench("scale_bench.py", "--smoke", "--workdir", tmp_path, timeout=600)
    (run,) = result.figures["results"]
    assert (run["images"], run["missing"]) == (40, 3)
    for name in RUNS:
        assert run[name]["wall_s"] > 0 and run[name]["cpu_s"] > 0 and run[name]["peak_pss_mib"] > 0, name
    assert "caption_resume_tty" not in run and "caption_dry_resumed" not in run
    for label in ("vision-server caption, resume", "vision-caption-folder-images.sh, resume, terminal"):
        assert label in result.stdout
    assert not (tmp_path / "tree-40").exists()  # the tree is deleted after its count
