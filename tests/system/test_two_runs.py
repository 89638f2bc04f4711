"""Two runs over one dataset at once, as real processes: one JSONL/Parquet output, one writer.

A user who starts a second overnight run by mistake (or on a second machine sharing the folder)
must not end up with every row twice, nor lose rows when one run folds the Parquet journal the
other is still appending to. The first run holds a lock on each such output; a second run into
the same file, from ``vision-server caption`` or ``vision-client folder``, stops at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import paths
from tests.support.bulk_data import caption_command, cli_env, good_images
from tests.support.full_disk import small_ext2_disk
from tests.support.meanwhile import (
    folder_of_images,
    make_folder,
    make_pipe,
    run_with_captions_written_meanwhile,
)
from tests.support.processes import free_port
from vision_server.output_lock import holding

FOLDER_SCRIPT = paths.REPO / "clients" / "vision-caption-folder-images.sh"
CLIENT = shutil.which("vision-client", path=str(Path(sys.executable).parent)) or "vision-client"

IMAGES = 16
FAST = ("--model", "test:tiny", "--max-new-tokens", "8", "--num-beams", "1", "--workers", "1")


def caption_into_jsonl(tmp_path: Path, root: Path, jsonl: Path) -> subprocess.CompletedProcess[str]:
    """``vision-server caption ROOT --jsonl JSONL`` run to its end (the tiny model, fast)."""
    return subprocess.run(
        caption_command(root, *FAST, "--jsonl", jsonl, "--cache-dir", tmp_path / "cache"),
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def complete_rows(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_second_run_into_the_same_outputs_stops_at_once_and_the_first_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    good_images(root, IMAGES)
    jsonl, parquet = tmp_path / "out" / "captions.jsonl", tmp_path / "out" / "captions.parquet"
    jsonl.parent.mkdir()
    cache = tmp_path / "cache"
    common = (root, *FAST, "--max-batch-size", "2", "--cache-dir", cache)
    args = (*common, "--jsonl", jsonl, "--parquet", parquet)
    env = cli_env(tmp_path)
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log, subprocess.Popen(caption_command(*args), env=env, stderr=log) as first:
        try:
            deadline = time.monotonic() + 300
            # It has the outputs open and is captioning. Each image's row goes to the JSONL and
            # then to the Parquet journal: the dry run below counts an image done when both hold
            # it, so wait for both (a stop between the two writes left one image short).
            journal = parquet.with_name(f".{parquet.name}.journal.jsonl")
            while min(complete_rows(jsonl), complete_rows(journal)) < 2:
                assert first.poll() is None, first_log.read_text()
                assert time.monotonic() < deadline, first_log.read_text()
                time.sleep(0.02)
            # Held mid-run (the lock is the process's, paused or not), so the second runs are
            # sure to meet it however fast or slow this machine is.
            first.send_signal(signal.SIGSTOP)
            rows_then = jsonl.read_bytes()
            # the same outputs, spelled another way (from another working directory)
            second = subprocess.run(
                caption_command(*common, "--jsonl", "captions.jsonl", "--parquet", parquet),
                cwd=jsonl.parent,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            # vision-client folder into the same JSONL stops before it asks any server
            client = subprocess.run(
                [
                    CLIENT,
                    "--url",
                    f"http://127.0.0.1:{free_port()}",
                    "--retries",
                    "0",
                    "folder",
                    str(root),
                    "--jsonl",
                    str(jsonl),
                    "--wait-for-server",
                    "0",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            # a dry run writes nothing and takes no lock: what is left can be asked meanwhile
            dry = subprocess.run(
                caption_command(*args, "--dry-run"), env=env, capture_output=True, text=True, timeout=300
            )
            assert jsonl.read_bytes() == rows_then  # none of them wrote a byte
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(600) == 0, first_log.read_text()

    assert second.returncode == 2, second.stderr
    assert "captions.jsonl is being written by another run" in second.stderr, second.stderr
    assert "run this command again" in second.stderr
    assert "loading the model" not in second.stderr  # stopped before any work
    assert client.returncode == 2, client.stderr
    assert "is being written by another run" in client.stderr, client.stderr
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("skip\t") >= 2 and "caption\t" in dry.stdout, dry.stdout

    keys = Counter(json.loads(line)["key"] for line in jsonl.read_text(encoding="utf-8").splitlines())
    assert len(keys) == IMAGES and set(keys.values()) == {1}  # each image once, no row twice
    table = pq.read_table(parquet)
    assert table.num_rows == IMAGES and len(set(table.column("key").to_pylist())) == IMAGES
    left = sorted(path.name for path in jsonl.parent.iterdir())
    assert left == [".captions.jsonl.lock", ".captions.parquet.lock", "captions.jsonl", "captions.parquet"]

    # Once the first run is over, the same command resumes: nothing is left to do.
    rerun = subprocess.run(caption_command(*args), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"captioned 0, skipped {IMAGES}" in rerun.stderr, rerun.stderr


def test_a_second_run_refused_by_the_lock_made_and_deleted_nothing_in_the_output_folder(
    tmp_path: Path,
) -> None:
    # The check that a new output can be made (it makes it and deletes it) ran before the lock:
    # a first run whose JSONL had just appeared could lose it to a second run's check.
    root = tmp_path / "data"
    good_images(root, 1)
    out = tmp_path / "out"
    out.mkdir()
    jsonl = out / "captions.jsonl"
    with holding([jsonl]):  # a first run holds it, its JSONL not written yet
        past = time.time() - 3600
        os.utime(out, (past, past))  # any file made and deleted there moves this to now
        before = out.stat().st_mtime_ns
        second = caption_into_jsonl(tmp_path, root, jsonl)
        assert second.returncode == 2, second.stderr
        assert "captions.jsonl is being written by another run" in second.stderr
        assert out.stat().st_mtime_ns == before, "the refused run made or deleted a file in the output folder"
    assert sorted(path.name for path in out.iterdir()) == [".captions.jsonl.lock"]


def test_an_output_folder_that_does_not_exist_is_refused_and_not_made_by_the_lock(tmp_path: Path) -> None:
    # The lock (filelock) makes a missing folder for its file: the folder is checked first, also
    # where a symlinked output points.
    root = tmp_path / "data"
    good_images(root, 1)
    linked = tmp_path / "linked.jsonl"
    linked.symlink_to(tmp_path / "elsewhere" / "captions.jsonl")
    for output, folder in ((tmp_path / "missing" / "captions.jsonl", "missing"), (linked, "elsewhere")):
        result = caption_into_jsonl(tmp_path, root, output)
        assert result.returncode == 2, result.stderr
        assert f"folder {tmp_path / folder} does not exist; create it first (mkdir -p" in result.stderr
        assert not (tmp_path / folder).exists()


def test_a_lock_file_in_the_way_stops_the_run_before_any_work_saying_what_to_remove(tmp_path: Path) -> None:
    # A dangling .captions.jsonl.lock link: the run went on without a lock, only warned.
    root = tmp_path / "data"
    good_images(root, 1)
    jsonl = tmp_path / "captions.jsonl"
    lock = tmp_path / ".captions.jsonl.lock"
    lock.symlink_to(tmp_path / "gone.lock")
    result = caption_into_jsonl(tmp_path, root, jsonl)
    assert result.returncode == 2, result.stderr
    assert f"its lock file {lock} is a symbolic link" in result.stderr
    assert f"remove it (rm {lock})" in result.stderr and "another run" not in result.stderr
    assert not jsonl.exists() and not list(root.rglob("*.txt"))


def test_a_disk_with_no_room_for_the_lock_file_is_a_full_disk_not_a_usage_error(tmp_path: Path) -> None:
    # Resuming into a JSONL on a disk without a free inode: the empty lock file cannot be made.
    # It was a usage error (exit 2) saying the lock file "cannot be made" and to remove it.
    root = tmp_path / "data"
    good_images(root, 1)
    with small_ext2_disk(tmp_path / "disk") as disk:
        jsonl = disk / "captions.jsonl"
        jsonl.write_text("", encoding="utf-8")
        (disk / "fill").mkdir()
        with pytest.raises(OSError):  # every inode taken
            for number in range(100_000):
                (disk / "fill" / str(number)).touch()
        result = caption_into_jsonl(tmp_path, root, jsonl)
    assert result.returncode == 1, result.stderr
    assert (
        f"cannot lock {jsonl}: no room for its lock file .captions.jsonl.lock (no space left on the device); "
        "free some space there, then run this command again"
    ) in result.stderr, result.stderr
    assert "remove it" not in result.stderr and not list(root.rglob("*.txt"))


def test_vision_client_folder_leaves_a_caption_written_while_it_runs(
    tmp_path: Path, tiny_server_url: str
) -> None:
    # A skip-mode run is planned at its start, maybe hours before it reaches an image; a caption
    # saved meanwhile in the gallery, or written by another run over the folder, must stay. It was
    # replaced by the model's caption, for the images not sent yet and for those in flight.
    images = folder_of_images(tmp_path / "data", 12)
    command = [
        CLIENT,
        "--url",
        tiny_server_url,
        "folder",
        str(images[0].parent),
        "--task",
        "caption",
        "-j",
        "2",
    ]
    returncode, _, stderr, hand = run_with_captions_written_meanwhile(command, cli_env(tmp_path), images)
    assert returncode == 0, stderr
    assert {target: target.read_text(encoding="utf-8") for target in hand} == hand
    assert f"{len(images) - len(hand)} captioned, {len(hand)} skipped, 0 failed" in stderr, stderr


def test_vision_server_caption_counts_a_caption_file_written_meanwhile_as_skipped(tmp_path: Path) -> None:
    # The run plans images ahead of the model (32 at a time), so the images planned before the
    # pause are captioned by the model and only then find their caption file there. The file was
    # left alone, but the summary counted the image as captioned.
    images = folder_of_images(tmp_path / "data", 12)
    command = caption_command(
        images[0].parent, *FAST, "--max-batch-size", "2", "--cache-dir", tmp_path / "cache"
    )
    returncode, _, stderr, hand = run_with_captions_written_meanwhile(command, cli_env(tmp_path), images)
    assert returncode == 0, stderr
    assert {target: target.read_text(encoding="utf-8") for target in hand} == hand
    assert f"captioned {len(images) - len(hand)}, skipped {len(hand)}, failed 0" in stderr, stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="the folder script needs curl")
def test_the_folder_script_leaves_a_caption_written_while_it_runs(
    tmp_path: Path, tiny_server_url: str
) -> None:
    # As vision-client folder: it decided at its start which images to skip, and replaced a
    # caption saved meanwhile, for the images it had not sent yet and for those in flight.
    images = folder_of_images(tmp_path / "data", 12)
    env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("VISION_")}
    env["VISION_HOST"] = tiny_server_url
    command = [str(FOLDER_SCRIPT), "-j", "2", "CAPTION", "txt", str(images[0].parent)]
    returncode, _, stderr, hand = run_with_captions_written_meanwhile(command, env, images, group=True)
    assert returncode == 0, stderr
    assert {target: target.read_text(encoding="utf-8") for target in hand} == hand
    found = f"12 image(s) found: {12 - len(hand)} captioned, {len(hand)} skipped (caption exists), 0 failed"
    assert found in stderr, stderr
    assert sorted(p.name for p in images[0].parent.iterdir() if p.name.startswith(".")) == []  # no temp file


NOT_A_CAPTION = {
    "pipe": "is not a regular file (a pipe, socket or device), not a caption file",
    "folder": "is a directory, not a caption file",
}


@pytest.mark.parametrize("made", ["pipe", "folder"])
@pytest.mark.parametrize("tool", ["vision-server caption", "vision-client folder", "folder script"])
def test_a_pipe_or_folder_made_where_a_caption_belongs_while_a_skip_run_goes_fails_the_image(
    tool: str, made: str, tmp_path: Path, tiny_server_url: str
) -> None:
    # A pipe or a folder is no caption: a run that finds one where a caption file belongs fails
    # the image ("a.txt is not a regular file (...)", "a.txt is a directory, ..."). One made
    # while a skip-mode run went was taken for a caption written meanwhile (vision-server
    # caption, vision-client folder: the image skipped); the folder script replaced a pipe with
    # the caption and moved the caption into a folder, saying ok. Now the image fails in the
    # planning's words and what was made stays, made before the image was sent or while it was.
    if tool == "folder script" and shutil.which("curl") is None:
        pytest.skip("the folder script needs curl")
    images = folder_of_images(tmp_path / "data", 12)
    env = cli_env(tmp_path)
    group = tool == "folder script"
    if tool == "vision-server caption":
        command = caption_command(
            images[0].parent, *FAST, "--max-batch-size", "2", "--cache-dir", tmp_path / "cache"
        )
    elif tool == "vision-client folder":
        command = [
            CLIENT,
            "--url",
            tiny_server_url,
            "folder",
            str(images[0].parent),
            "--task",
            "caption",
            "-j",
            "2",
        ]
    else:
        env = {k: v for k, v in env.items() if not k.startswith("VISION_")}
        env["VISION_HOST"] = tiny_server_url
        command = [str(FOLDER_SCRIPT), "-j", "2", "CAPTION", "txt", str(images[0].parent)]
    returncode, _, stderr, placed = run_with_captions_written_meanwhile(
        command, env, images, group=group, place=make_pipe if made == "pipe" else make_folder
    )
    assert returncode == 1, stderr
    for target in placed:
        if made == "pipe":
            assert stat.S_ISFIFO(target.lstat().st_mode), target
        else:
            assert target.is_dir() and not list(target.iterdir()), target
        reason = f"{target.with_suffix('.png').name}: {target.name} {NOT_A_CAPTION[made]}"
        assert any(line.rstrip().endswith(reason) for line in stderr.splitlines()), stderr
    assert "written meanwhile" not in stderr and "Traceback" not in stderr, stderr
