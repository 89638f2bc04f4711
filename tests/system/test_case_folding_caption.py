"""``vision-server caption`` (its Python entry, the real pipeline and tiny model) on a disk that folds case.

No case-insensitive file system can be mounted here (that needs root), so the run is given the
answer a macOS or Windows disk gives (``CaptionRequest.case_probe``); everything else is the real
command in a process of its own: readers, plan, decoding workers, the engine, caption files. The
same folder on this disk (ext4) is in tests/system/test_dataset_tools_agree.py, through each
tool's real process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.api import tiny_cache_dir
from tests.support.bulk_data import cli_env, picture

PAIR = "neither is captioned, rename one of them"
# run_caption as the command line calls it, with a file system that folds case in every folder
FOLDING_RUN = """
import sys
from pathlib import Path
from vision_server.bulk.command import CaptionRequest, run_caption
from vision_server.settings import Settings

settings = Settings(model="test:tiny", cache_dir=Path(sys.argv[1]), max_new_tokens=8, log_level="warning")
request = CaptionRequest(
    inputs=tuple(Path(arg) for arg in sys.argv[2:]),
    tasks=("<CAPTION>",),
    workers=1,
    case_probe=lambda folder: True,
)
sys.exit(run_caption(settings, request))
"""


def test_a_run_on_a_disk_that_folds_case_captions_neither_image_of_a_case_pair(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    elsewhere = tmp_path / "more"
    root.mkdir()
    elsewhere.mkdir()
    for seed, name in enumerate(("b.jpg", "B.png", "c.png")):
        (root / name).write_bytes(picture(seed))
    for seed, name in enumerate(("d.jpg", "D.webp", "e.png"), start=3):
        (elsewhere / name).write_bytes(picture(seed))
    listing = tmp_path / "list.txt"
    listing.write_text("more/d.jpg\nmore/e.png\nmore/D.webp\n", encoding="utf-8")
    cache = tiny_cache_dir(tmp_path_factory)
    command = [sys.executable, "-c", FOLDING_RUN, str(cache), str(root), str(listing)]
    result = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    status, err = result.returncode, result.stderr
    assert status == 1, err
    for image, caption, other in (
        (root / "b.jpg", "b.txt", "B.png"),
        (root / "B.png", "B.txt", "b.jpg"),
        ("more/d.jpg", "d.txt", "more/D.webp"),
        ("more/D.webp", "D.txt", "more/d.jpg"),
    ):
        assert f"{image}: shares its caption file {caption} with {other}; {PAIR}" in err, err[-3000:]
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.txt")) == [
        "data/c.txt",
        "list.txt",
        "more/e.txt",
    ]
    assert "captioned 2, skipped 0, failed 4" in err
