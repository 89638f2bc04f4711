"""A disk that fills up mid-run, for real: every folder captioner stops, keeps what it wrote whole,
and the rerun after freeing space finishes the job.

The dataset sits on a small tmpfs mounted for the test (``tests.support.full_disk``) and filled
up to a few pages, so the kernel itself refuses the writes (``ENOSPC``, a short write first where
a write crosses into a page it cannot have). Expected of ``vision-server caption`` (caption files,
``--jsonl``, ``--parquet``), ``vision-client folder`` (caption files, ``--jsonl``) and
``vision-caption-folder-images.sh``: the run stops at the first refused write (not one failure per
image left), says which file and "no space left", prints its summary, leaves no temporary file,
half caption or torn JSONL line, and a rerun once space is free captions each image left, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import images, paths
from tests.support.bulk_data import caption_command, cli_env
from tests.support.full_disk import PAGE, fill, fill_exactly, small_disk, small_ext2_disk
from tests.support.processes import ServerProcess, http_json

IMAGES = 40
FAST = ("--model", "test:tiny", "--max-new-tokens", "8", "--num-beams", "1", "--log-level", "warning")
FOLDER_SCRIPT = paths.REPO / "clients" / "vision-caption-folder-images.sh"
VISION_CLIENT = Path(sys.executable).with_name("vision-client")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system holding ``IMAGES`` small images (a page each) in ``data/``."""
    with small_disk(tmp_path / "disk", "2m") as root:
        for n in range(IMAGES):
            images.save(root / "data" / f"img{n:03d}.png", n, (16, 16))
        yield root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk-full-cache")


def caption(tmp: Path, cache: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = caption_command(*args, *FAST, "--cache-dir", cache, "--workers", "1")
    return subprocess.run(command, env=cli_env(tmp), capture_output=True, text=True, timeout=300)


def leftovers(root: Path) -> list[str]:
    """Temporary files of any writer: caption temps, fold temps."""
    return sorted(path.name for path in root.rglob("*") if path.name.endswith(".tmp"))


def whole_rows(path: Path) -> list[dict]:
    """Every line of a JSONL file, each of which must parse and end with a newline."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def assert_stopped_once(stderr: str, culprit: str) -> None:
    """One stop that names the file and the cause, not one failure per image left."""
    assert "no space left" in stderr, stderr
    assert culprit in stderr, stderr
    assert stderr.count("no space left") <= 3, stderr  # said when it happens, and in the summary
    assert re.search(r"\bfailed 0\b|\b0 failed\b", stderr), stderr
    assert "FAILED" not in stderr, stderr


def test_caption_stops_when_the_disk_fills_and_the_rerun_finishes(
    tmp_path: Path, cache: Path, disk: Path
) -> None:
    """Caption files and a JSONL file on a disk with room for about a dozen rows."""
    data, jsonl = disk / "data", disk / "out.jsonl"
    filler = fill(disk, leave=8 * PAGE)

    full = caption(tmp_path, cache, data, "--sidecars", "--jsonl", jsonl)

    assert full.returncode == 1, full.stderr
    assert_stopped_once(full.stderr, str(disk))
    assert "stopped early" in full.stderr and "run the same command again" in full.stderr
    assert leftovers(disk) == []
    rows = whole_rows(jsonl)
    written = sorted(data.glob("*.txt"))
    assert len(written) < IMAGES  # the disk did fill up
    for path in written:  # every caption file there is whole: one of the rows' captions
        assert path.read_text(encoding="utf-8").strip()

    filler.unlink()
    again = caption(tmp_path, cache, data, "--sidecars", "--jsonl", jsonl)

    assert again.returncode == 0, again.stderr
    assert len(list(data.glob("*.txt"))) == IMAGES
    keys = [row["key"] for row in whole_rows(jsonl)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == IMAGES  # each image once
    assert {row["key"] for row in rows} <= set(keys)
    assert leftovers(disk) == []


def test_parquet_run_stops_and_keeps_its_table_whole(tmp_path: Path, cache: Path, disk: Path) -> None:
    """The journal fills up mid-run and the fold at the end finds no room either: the table is as
    it was, readable, the rows wait in the journal, and the rerun folds every image in once."""
    data, table = disk / "data", disk / "out.parquet"
    first = caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars", "--limit", "10")
    assert first.returncode == 0, first.stderr
    filler = fill(disk, leave=PAGE)  # room for about 20 rows in the journal, none for a fold

    full = caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars")

    assert full.returncode == 1, full.stderr
    assert_stopped_once(full.stderr, "out.parquet")
    assert "stopped early" in full.stderr  # the journal filled up mid-run
    assert "rows wait in .out.parquet.journal.jsonl" in full.stderr  # and the fold found no room
    assert pq.read_table(table).num_rows == 10  # as it was, readable
    assert 0 < len(whole_rows(disk / ".out.parquet.journal.jsonl")) < IMAGES - 10
    assert leftovers(disk) == []

    filler.unlink()
    again = caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars")

    assert again.returncode == 0, again.stderr
    keys = pq.read_table(table).column("key").to_pylist()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == IMAGES
    assert not (disk / ".out.parquet.journal.jsonl").exists()
    assert leftovers(disk) == []


@pytest.mark.parametrize("output", ["captions", "jsonl"])
def test_vision_client_folder_stops_when_the_disk_fills(
    tiny_server_url: str, tmp_path: Path, disk: Path, output: str
) -> None:
    data, jsonl = disk / "data", disk / "out.jsonl"
    # Rows of some 300 bytes: a page holds about a dozen, and one row is cut by the page's end.
    extra = ["--jsonl", str(jsonl), "--prefix", "trigger word, " * 15] if output == "jsonl" else []

    def folder() -> subprocess.CompletedProcess[str]:
        command = [
            str(VISION_CLIENT),
            "--url",
            tiny_server_url,
            "folder",
            str(data),
            "--task",
            "CAPTION",
            *extra,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    filler = fill(disk, leave=(1 if output == "jsonl" else 8) * PAGE)
    full = folder()

    assert full.returncode == 1, full.stderr
    assert_stopped_once(full.stderr, str(jsonl) if output == "jsonl" else str(data))
    assert "Stopped early" in full.stderr and "run the same command again" in full.stderr
    assert leftovers(disk) == []
    if output == "jsonl":
        assert 0 < len(whole_rows(jsonl)) < IMAGES

    filler.unlink()
    again = folder()

    assert again.returncode == 0, again.stderr
    if output == "jsonl":
        files = [row["file"] for row in whole_rows(jsonl)]
        assert sorted(files) == sorted(set(files)) and len(files) == IMAGES
    else:
        assert all(path.with_suffix(".txt").read_text().strip() for path in data.glob("*.png"))
    assert leftovers(disk) == []


def test_vision_client_folder_stops_when_a_torn_jsonl_line_cannot_be_ended(
    tiny_server_url: str, disk: Path
) -> None:
    """A killed run left the JSONL's last line torn, and the disk is full: ending that line is the
    run's first write, and it stops the run as any full disk does (the file, what to do, the
    summary), not with a bare error; the rerun after freeing space captions every image."""
    data, jsonl = disk / "data", disk / "out.jsonl"
    row = '{"file": "img000.png", "task": "<CAPTION>", "caption": "x", "model": null}\n'
    torn = '{"file": "img001.png", "task": "<CAP'
    # Exactly one page: the newline that ends the torn line needs a page the disk cannot give.
    jsonl.write_text(row + torn + " " * (PAGE - len(row) - len(torn)), encoding="utf-8")
    command = [str(VISION_CLIENT), "--url", tiny_server_url, "folder", str(data), "--task", "CAPTION"]
    filler = fill(disk, leave=0)
    full = subprocess.run([*command, "--jsonl", str(jsonl)], capture_output=True, text=True, timeout=300)

    assert full.returncode == 1, full.stderr
    assert f"cannot write {jsonl}: no space left on the device" in full.stderr, full.stderr
    assert "Stopped early" in full.stderr and "run the same command again" in full.stderr
    assert not full.stderr.startswith("error:"), full.stderr
    assert jsonl.stat().st_size == PAGE  # nothing half-written

    filler.unlink()
    again = subprocess.run([*command, "--jsonl", str(jsonl)], capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr
    files = [row["file"] for row in whole_rows_after_torn(jsonl)]
    assert sorted(files) == [f"img{n:03d}.png" for n in range(IMAGES)]


def whole_rows_after_torn(path: Path) -> list[dict]:
    """The rows of a JSONL file whose torn line a later run ended: every other line whole."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-80:]
    rows = []
    for line in data.decode("utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            assert line.startswith('{"file": "img001.png", "task": "<CAP'), line
    return rows


def test_folder_script_stops_when_the_disk_fills(tiny_server_url: str, tmp_path: Path, disk: Path) -> None:
    data = disk / "data"
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
    env["TMPDIR"] = str(tmp_path)  # its own work files are on another disk, as usual

    def folder() -> subprocess.CompletedProcess[str]:
        command = [str(FOLDER_SCRIPT), "--url", tiny_server_url, "-q", "CAPTION", "txt", str(data)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    filler = fill(disk, leave=8 * PAGE)
    full = folder()

    assert full.returncode == 1, full.stderr
    assert_stopped_once(full.stderr, str(data))
    assert "Stopped early" in full.stderr and "run the same command again" in full.stderr
    assert leftovers(disk) == []
    assert len(list(data.glob("*.txt"))) < IMAGES

    filler.unlink()
    again = folder()

    assert again.returncode == 0, again.stderr
    assert all(path.with_suffix(".txt").read_text().strip() for path in data.glob("*.png"))
    assert leftovers(disk) == []


def test_folder_script_stops_when_a_caption_rename_finds_the_disk_full(
    tiny_server_url: str, tmp_path: Path
) -> None:
    """The caption is written, but renaming it into place needs room the disk no longer has (a
    folder whose blocks are full must take one more for the caption's name): the run stops at
    that image, as at any full-disk write, instead of failing it and every image after it with
    "cannot create the caption file: mv: ... No space left on device". On ext2, as tmpfs never
    refuses a rename; the rerun with space free captions all of them."""
    with small_ext2_disk(tmp_path / "disk") as root:
        data = root / "data"
        stems = [f"img{n}_" + "x" * 120 for n in range(3)]  # a caption's name takes 136 bytes of folder
        for n, stem in enumerate(stems):
            images.save(data / f"{stem}.png", n, (16, 16))
        spare = root / "spare"
        spare.write_bytes(b"\0" * 1024)  # one block: the caption (32 tokens at most) fits in it
        filler = fill_exactly(root)
        pads = 0
        with contextlib.suppress(OSError):  # till the folder cannot grow: its last block is full
            while True:
                (data / f".pad{pads:032d}").touch()  # a name as long as the temporary caption's
                pads += 1
        (data / f".pad{pads - 1:032d}").unlink()  # room for the temporary caption's name only
        spare.unlink()
        env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
        env["TMPDIR"] = str(tmp_path)
        command = [str(FOLDER_SCRIPT), "--url", tiny_server_url, "--jobs", "1", "CAPTION", "txt", str(data)]
        full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

        assert full.returncode == 1, full.stderr
        assert_stopped_once(full.stderr, f"cannot write {data}/{stems[0]}.txt: no space left on the device")
        assert "Stopped early, 3 image(s) not attempted" in full.stderr, full.stderr  # that one too
        assert leftovers(root) == []
        assert list(data.glob("*.txt")) == []

        filler.unlink()
        again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

        assert again.returncode == 0, again.stderr
        assert all((data / f"{stem}.txt").read_text().strip() for stem in stems)
        assert leftovers(root) == []


def test_folder_script_says_at_once_when_its_temporary_directory_is_full(
    tiny_server_url: str, tmp_path: Path
) -> None:
    """Its workers hand results over through files in TMPDIR: on a full disk each one died without
    a word, and every image failed as "the worker stopped unexpectedly"."""
    data = tmp_path / "data"
    for n in range(3):
        images.save(data / f"img{n}.png", n, (16, 16))
    with small_disk(tmp_path / "tmp", "256k") as scratch:
        fill(scratch)
        env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
        env["TMPDIR"] = str(scratch)
        command = [str(FOLDER_SCRIPT), "--url", tiny_server_url, "CAPTION", "txt", str(data)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert sorted(path.name for path in scratch.iterdir()) == ["filler"]  # nothing left there
    assert result.returncode == 1, result.stderr
    assert f"cannot write in the temporary directory {scratch}" in result.stderr
    assert "no space left" in result.stderr and "stopped unexpectedly" not in result.stderr
    assert not list(data.glob("*.txt"))


def test_vision_client_sh_names_its_full_temporary_directory_and_what_to_do(tmp_path: Path) -> None:
    """The image is encoded into a temporary file: on a full TMPDIR the script said only
    "printf: write error: No space left on device" (or blamed the image). Now it names the file
    and TMPDIR, says what to do, exits 1 (its --help: a temporary file cannot be written), and
    leaves nothing there. No server is needed: it stops before the request."""
    image = tmp_path / "photo.png"
    images.save(image, 1, (64, 64))  # about 12 KB: its base64 needs several pages
    client = paths.REPO / "clients" / "vision-client.sh"
    with small_disk(tmp_path / "tmp", "256k") as scratch:
        env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_")}
        env["TMPDIR"] = str(scratch)

        def caption(*stdin: Path) -> subprocess.CompletedProcess[str]:
            command = [str(client), "--url", "http://127.0.0.1:9", "CAPTION", "-" if stdin else str(image)]
            with open(stdin[0] if stdin else os.devnull, "rb") as source:
                return subprocess.run(
                    command, stdin=source, capture_output=True, text=True, env=env, timeout=60
                )

        filler = fill(scratch)
        full = caption()
        filler.unlink()
        filler = fill(scratch, leave=2 * PAGE)  # room for its config, not for the image
        short = [caption(), caption(image)]
        assert sorted(path.name for path in scratch.iterdir()) == ["filler"]  # nothing left there
    for result, file in zip([full, *short], ["curlrc", "body", "stdin-image"], strict=True):
        assert result.returncode == 1, result.stderr
        assert re.search(
            rf"cannot write the temporary file \S+/{file}: no space left in {scratch}", result.stderr
        )
        assert "free some space there, or set TMPDIR to a folder with space" in result.stderr
        assert "write error" not in result.stderr and "cannot read" not in result.stderr, result.stderr


def test_a_full_log_file_disk_is_said_once_and_the_server_goes_on(tmp_path: Path) -> None:
    """``--log-file`` on a disk that fills up: the logging module printed a "--- Logging error ---"
    traceback on stderr for every line (a flooded service journal). Now one line says it, the
    server answers as before, and the file gets lines again once there is room."""
    with small_disk(tmp_path / "logs", "64k") as logs:
        log_file = logs / "server.log"
        with ServerProcess.fake(tmp_path, "server", delay=0, log_file=log_file) as server:
            url = server.wait_listening()
            filler = fill(logs, leave=PAGE)
            for _ in range(60):  # an access log line each: more than the page left
                assert http_json(f"{url}/v1/models")[0] == 200
            filler.unlink()
            for _ in range(3):
                assert http_json(f"{url}/v1/models")[0] == 200
            server.stop()
            stderr = server.log_text()
        lines = log_file.read_text(encoding="utf-8").splitlines()
    assert "Logging error" not in stderr and "Traceback" not in stderr
    said = f"cannot write the log file {log_file}: no space left on the device"
    assert stderr.count(said) == 1, stderr
    assert f"writing the log file {log_file} again" in stderr
    assert stderr.count("GET /v1/models 200") == 63  # stderr got every line all along
    assert all(line.startswith("20") for line in lines)  # whole lines, none torn


@pytest.mark.parametrize("where", ["local", "ray"])
def test_a_fold_that_finds_the_disk_full_fails_the_run(
    tmp_path: Path, cache: Path, disk: Path, where: str
) -> None:
    """A rerun with nothing to caption (``--limit 0``) still folds the journal a stopped run left;
    when that fold finds no room, the rows are not in the table: exit 1, with and without
    ``--ray`` (whose run ends before Ray starts here, so no cluster is needed)."""
    data, table = disk / "data", disk / "out.parquet"
    assert (
        caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars", "--limit", "10").returncode == 0
    )
    fill(disk, leave=PAGE)
    assert caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars").returncode == 1
    journal = disk / ".out.parquet.journal.jsonl"
    assert journal.exists()

    ray = ("--ray",) if where == "ray" else ()
    again = caption(tmp_path, cache, data, "--parquet", table, "--no-sidecars", "--limit", "0", *ray)

    assert "rows wait in .out.parquet.journal.jsonl" in again.stderr, again.stderr
    assert again.returncode == 1, again.stderr
    assert pq.read_table(table).num_rows == 10 and journal.exists()
