"""``vision-server caption`` plans without torch: checking ``--task``, a dry run and a rerun that
finds every image captioned import neither torch nor transformers (seconds of CPU), as the task
list comes from the backend alone and the captioner is built for the first image to caption.

Each case runs the real command in a fresh interpreter that writes, at exit, which of the two
modules it imported; a run that captions shows the probe sees them when they are imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bulk_data import cli_env, good_images

HEAVY = ("torch", "transformers")
# Runs the CLI's own entry point, then (atexit: also after its sys.exit) names what it imported.
PROBE = """
import atexit, sys
from vision_server.cli import main
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(" ".join(m for m in {heavy!r} if m in sys.modules)))
sys.argv = ["vision-server", "caption", *args]
main()
"""


def run_probed(tmp: Path, *args: str | Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """The command's result and the heavy modules it imported."""
    report = tmp / "imported.txt"
    code = PROBE.format(heavy=HEAVY)
    command = [sys.executable, "-c", code, str(report), *map(str, args), "--cache-dir", str(tmp / "cache")]
    result = subprocess.run(command, env=cli_env(tmp), capture_output=True, text=True, timeout=300)
    assert report.is_file(), result.stderr
    return result, report.read_text(encoding="utf-8")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    good_images(root, 3)
    return root


def test_a_florence_dry_run_imports_no_torch(tmp_path: Path, folder: Path) -> None:
    result, imported = run_probed(tmp_path, folder, "--model", "test:tiny", "--task", "caption", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(
        line.startswith("caption\t") and line.endswith("\t<CAPTION>") for line in lines
    )
    assert imported == ""


def test_an_auto_backend_reads_config_json_without_torch(tmp_path: Path, folder: Path) -> None:
    """A BLIP model folder (config.json is all --backend auto reads): one task, a plain caption;
    a Florence-2 task is refused as bad usage, still without torch."""
    model = tmp_path / "blip"
    model.mkdir()
    config = {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result, imported = run_probed(tmp_path, folder, "--model", model, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [line.rsplit("\t", 1)[1] for line in result.stdout.splitlines()] == ["<CAPTION>"] * 3
    assert imported == ""
    refused, imported = run_probed(tmp_path, folder, "--model", model, "--task", "ocr", "--dry-run")
    assert refused.returncode == 2 and "Valid prompts: <CAPTION>" in refused.stderr, refused.stderr
    assert imported == ""


def test_a_rerun_with_every_image_captioned_imports_no_torch(tmp_path: Path, folder: Path) -> None:
    """Resuming a finished run (caption files and JSONL rows of this model for every image) is a
    listing: the summary and exit 0, without building the captioner."""
    images = sorted(path for path in folder.rglob("*") if path.is_file())
    rows = tmp_path / "rows.jsonl"
    with rows.open("w", encoding="utf-8") as out:
        for image in images:
            image.with_suffix(".txt").write_text("a caption from the first run", encoding="utf-8")
            key = image.relative_to(folder).as_posix()
            row = {"source": str(folder), "key": key, "task": "<CAPTION>", "caption": "a caption"}
            out.write(json.dumps({**row, "model": "test:tiny", "adapter": None}) + "\n")
    args = (folder, "--model", "test:tiny", "--task", "caption", "--log-level", "warning")
    result, imported = run_probed(tmp_path, *args, "--jsonl", rows, "--sidecars")
    assert result.returncode == 0, result.stderr
    assert f"captioned 0, skipped {len(images)}, failed 0" in result.stderr, result.stderr
    assert imported == ""


def test_a_run_that_captions_imports_them(tmp_path: Path, folder: Path) -> None:
    """The probe is not blind: captioning needs the model stack, and the probe sees it."""
    fast = ("--max-new-tokens", "4", "--num-beams", "1", "--limit", "1")
    result, imported = run_probed(tmp_path, folder, "--model", "test:tiny", *fast)
    assert result.returncode == 0, result.stderr
    assert imported.split() == list(HEAVY)
