"""``vision-server caption`` on real files, as a real subprocess, with the tiny model.

The big run (a messy folder of a few hundred images through a queue of 2) is made once per
module and checked from several sides: nothing lost, every bad file reported, sidecars equal to
what a running server answers, JSONL and Parquet agreeing with the sidecars, a rerun doing
nothing. Other tests cover interrupts, several tasks, Parquet and WebDataset inputs, the dry
run, the limit, and usage errors.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import hidden_names
from tests.support.bulk_data import caption_command, cli_env, good_images, messy_folder, picture
from tests.support.gated import gated_caption_command
from tests.support.leftovers import OLD, YOUNG, aged, caption_temp
from tests.support.processes import tiny_server

MESSY_IMAGES = 200
# Short greedy captions keep a queue of 2 (so batches of at most 2) fast enough for the suite;
# the server the sidecars are compared with runs with the same options.
FAST_OPTIONS = ("--max-new-tokens", "8", "--num-beams", "1")
FAST = ("--model", "test:tiny", *FAST_OPTIONS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bulk-cache")


def run(
    tmp: Path, cache: Path, *args: str | Path, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``vision-server caption ARGS`` (warnings only), from ``cwd`` when given."""
    command = caption_command(*args, "--cache-dir", cache, "--log-level", "warning")
    return subprocess.run(command, cwd=cwd, env=cli_env(tmp), capture_output=True, text=True, timeout=timeout)


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sidecar(image: Path, ext: str = ".txt") -> Path:
    return image.with_suffix(ext)


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@dataclass
class MessyRun:
    root: Path
    good: dict[Path, bytes]
    reasons: dict[str, str]
    result: subprocess.CompletedProcess[str]
    jsonl: Path
    parquet: Path


@pytest.fixture(scope="module")
def fast_server_url(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[str]:
    """``vision-server serve`` as a real process with the generation options of ``FAST``."""
    with tiny_server(tmp_path_factory.mktemp("fast-server"), cache, *FAST_OPTIONS) as process:
        yield process.wait_listening(timeout=120)
        process.stop()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> MessyRun:
    tmp = tmp_path_factory.mktemp("messy")
    root = tmp / "my dataset"
    good, reasons = messy_folder(root, MESSY_IMAGES)
    jsonl, parquet = tmp / "out.jsonl", tmp / "out.parquet"
    result = run(
        tmp, cache, root, *FAST, "--max-queue", "2", "--jsonl", jsonl, "--parquet", parquet, "--sidecars"
    )
    return MessyRun(root, good, reasons, result, jsonl, parquet)


def test_messy_folder_loses_no_image_and_reports_every_bad_file(messy: MessyRun) -> None:
    result = messy.result
    assert result.returncode == 1, result.stderr  # some images failed
    assert "Traceback" not in result.stderr and "queue is full" not in result.stderr
    for image in messy.good:
        assert sidecar(image).read_bytes().strip(), f"no caption for {image}"
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == len(messy.reasons), result.stderr
    for name, reason in messy.reasons.items():
        line = next((line for line in failed_lines if f"/bad/{name}: " in line), None)
        assert line is not None and reason in line, (name, failed_lines)
    assert not [line for line in failed_lines if "send " in line]  # offline, the user sends nothing
    bad = messy.root / "bad"
    assert not sidecar(bad / "dup.jpg").exists()  # a stem clash writes neither caption
    assert not [p for p in bad.iterdir() if p.suffix == ".txt" and p.with_suffix(".png") not in messy.good]
    assert f"captioned {len(messy.good)}, skipped 0, failed {len(messy.reasons)}" in result.stderr
    assert not tmp_files(messy.root)


def test_sidecars_equal_what_the_server_answers(messy: MessyRun, fast_server_url: str) -> None:
    def ask(data: bytes) -> bytes:
        body = json.dumps({"image": base64.b64encode(data).decode(), "prompt": "<MORE_DETAILED_CAPTION>"})
        request = urllib.request.Request(
            f"{fast_server_url}/process_image", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["result"].encode("utf-8")

    images = sorted(messy.good)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [messy.good[image] for image in images]))
    for image, answer in zip(images, answers, strict=True):
        assert sidecar(image).read_bytes() == answer, image


def test_jsonl_and_parquet_hold_the_sidecars_captions(messy: MessyRun) -> None:
    rows = jsonl_rows(messy.jsonl)
    done = {row["key"]: row for row in rows if "error" not in row}
    errors = [row for row in rows if "error" in row]
    assert len(done) == len(messy.good) and len(errors) == len(messy.reasons)
    table = pq.read_table(messy.parquet).to_pylist()
    assert len(table) == len(messy.good) and "error" not in table[0]
    by_key = {row["key"]: row for row in table}
    for image in messy.good:
        key = image.relative_to(messy.root).as_posix()
        key = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        text = sidecar(image).read_text(encoding="utf-8")
        assert done[key]["caption"] == by_key[key]["caption"] == text, key
        assert done[key]["task"] == "<MORE_DETAILED_CAPTION>" and done[key]["model"] == "test:tiny"
        assert done[key]["source"] == by_key[key]["source"] == str(messy.root)
    assert any("\\xe9" in key for key in done)  # the non-UTF-8 name, spelled the same everywhere


def test_rerun_skips_what_is_done_and_adds_no_rows(messy: MessyRun, tmp_path: Path, cache: Path) -> None:
    before = messy.jsonl.read_text(encoding="utf-8")
    result = run(
        tmp_path, cache, messy.root, *FAST, "--jsonl", messy.jsonl, "--parquet", messy.parquet, "--sidecars"
    )
    assert result.returncode == 1, result.stderr
    assert f"captioned 0, skipped {len(messy.good)}, failed {len(messy.reasons)}" in result.stderr
    assert messy.jsonl.read_text(encoding="utf-8") == before  # not even the error rows again
    assert pq.read_table(messy.parquet).num_rows == len(messy.good)


# --- interrupts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stopped_halfway_then_rerun_captions_the_rest_once(tmp_path: Path, cache: Path, signum: int) -> None:
    root = tmp_path / "data"
    images = good_images(root, 36)
    out = tmp_path / "out.jsonl"
    args = (root, *FAST, "--max-batch-size", "2", "--jsonl", out, "--sidecars", "--log-level", "warning")
    command = caption_command(*args, "--cache-dir", cache)
    with subprocess.Popen(command, env=cli_env(tmp_path), stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 6):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        helpers = psutil.Process(process.pid).children(recursive=True)  # the decoding processes
        assert helpers
        process.send_signal(signum)
        code = process.wait(120)
        _, alive = psutil.wait_procs(helpers, timeout=20)
        assert not alive, "decoding processes outlived the command"  # even after kill -9
        stderr = process.stderr.read() if process.stderr else ""
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum), stderr
    if signum != signal.SIGKILL:
        assert "interrupted by" in stderr and "Traceback" not in stderr
        assert out.read_bytes().endswith(b"\n")
        assert not tmp_files(root)
    first = [row["key"] for row in jsonl_rows(out)] if out.read_bytes().endswith(b"\n") else None
    assert first is None or len(first) < len(images)  # it really stopped halfway

    result = run(tmp_path, cache, *args)
    assert result.returncode == 0, result.stderr
    keys = Counter(row["key"] for row in jsonl_rows(out))
    assert len(keys) == len(images) and set(keys.values()) == {1}
    assert all(sidecar(image).read_text(encoding="utf-8").strip() for image in images)
    # kill -9 can land while a caption file is being written: its temp file (never a caption file) may stay;
    # after a graceful stop none may.
    leftovers = tmp_files(root)
    assert all(path.name.startswith(".vision-caption.") for path in leftovers), leftovers
    assert signum == signal.SIGKILL or not leftovers, leftovers


def test_ctrl_c_while_starting_up_exits_130_not_aborted(tmp_path: Path, cache: Path) -> None:
    # Before the run's own stop handlers are in place (imports, model setup) Ctrl+C is Python's
    # KeyboardInterrupt; click turned it into "Aborted!" and exit 1, which says "an image failed".
    root = tmp_path / "data"
    good_images(root, 2)
    command = caption_command(root, *FAST, "--cache-dir", cache)

    def default_sigint() -> None:  # as from a terminal, even when the test runner ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        command, env=cli_env(tmp_path), stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    ) as process:
        maps = Path(f"/proc/{process.pid}/maps")
        deadline = time.monotonic() + 120
        while "libtorch" not in maps.read_text():  # torch is being imported: long before the run
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
        stderr = process.stderr.read() if process.stderr else ""
    assert code == 130, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr
    assert "interrupted by SIGINT" in stderr and "run the same command again" in stderr
    assert not list(root.rglob("*.txt"))


def test_ctrl_c_to_the_process_group_while_decoders_start_prints_no_worker_tracebacks(
    tmp_path: Path, cache: Path
) -> None:
    # A terminal's Ctrl+C goes to every process of the foreground group. Decoding processes spend
    # their first second importing the package; a SIGINT then was a KeyboardInterrupt traceback
    # from each of them under the run's own clean "interrupted by SIGINT" line.
    root = tmp_path / "data"
    good_images(root, 8)
    command = caption_command(root, *FAST, "--workers", "2", "--cache-dir", cache, "--log-level", "warning")

    def default_sigint() -> None:  # as from a terminal, even when the test runner ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        command,
        env=cli_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    ) as process:
        try:
            deadline = time.monotonic() + 120
            while not any(_importing(child) for child in _children(process.pid)):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.002)
            os.killpg(process.pid, signal.SIGINT)  # a decoder is half-way through its imports
            code = process.wait(120)
            stderr = process.stderr.read() if process.stderr else ""
        finally:  # a run that hangs on the signal (the old behaviour) must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted by SIGINT" in stderr and "run the same command again" in stderr


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _importing(process: psutil.Process) -> bool:
    """A decoding process that has got as far as numpy in importing the package (it imports more
    after that; until its imports are done it cannot ignore SIGINT itself)."""
    try:
        if "spawn_main" not in " ".join(process.cmdline()):
            return False
        return "_multiarray_umath" in Path(f"/proc/{process.pid}/maps").read_text()
    except (psutil.Error, OSError):
        return False


# --- several tasks -------------------------------------------------------------------------------


def test_several_tasks_in_one_pass(tmp_path: Path, cache: Path) -> None:
    root, single = tmp_path / "multi", tmp_path / "single"
    images = good_images(root, 6)
    good_images(single, 6)
    out, table = tmp_path / "m.jsonl", tmp_path / "m.parquet"
    tasks = ("--task", "generate_tags", "--task", "<Caption>")
    result = run(tmp_path, cache, root, *FAST, *tasks, "--jsonl", out, "--parquet", table, "--sidecars")
    assert result.returncode == 0, result.stderr
    for task in ("generate_tags", "caption"):
        alone = run(tmp_path, cache, single, *FAST, "--task", task)
        assert alone.returncode == 0, alone.stderr
        for image in images:
            mine = image.with_name(f"{image.stem}.{task}.txt").read_text(encoding="utf-8")
            twin = sidecar(single / image.relative_to(root)).read_text(encoding="utf-8")
            assert mine == twin and mine.strip()
        for image in single.rglob("*.txt"):
            image.unlink()
    assert not list(root.rglob("*[0-9].txt")) and not list(root.rglob("*ü.txt"))  # no plain sidecars
    rows = {row["key"]: row for row in jsonl_rows(out)}
    parquet_rows = {row["key"]: row for row in pq.read_table(table).to_pylist()}
    for image in images:
        key = image.relative_to(root).as_posix()
        for task in ("generate_tags", "caption"):
            text = image.with_name(f"{image.stem}.{task}.txt").read_text(encoding="utf-8")
            assert rows[key][task] == parquet_rows[key][task] == text
        assert rows[key]["tasks"] == ["<GENERATE_TAGS>", "<CAPTION>"]


def test_a_run_that_would_mix_row_shapes_in_an_output_is_refused(tmp_path: Path, cache: Path) -> None:
    """Rows of one task (task, caption) and of several (tasks, a field per task) never share a
    file: a run that would add the other shape stops before any work, says why and what to do.
    (Parquet outputs, and the other direction in detail: tests/unit/test_bulk_stages.py.)"""
    root = tmp_path / "data"
    good_images(root, 2)
    out, table = tmp_path / "c.jsonl", tmp_path / "c.parquet"
    first = run(tmp_path, cache, root, *FAST, "--task", "caption", "--jsonl", out, "--parquet", table)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes(), table.read_bytes()
    two_tasks = ("--task", "caption", "--task", "generate_tags")
    mixed = run(tmp_path, cache, root, *FAST, *two_tasks, "--jsonl", out, "--parquet", table)
    assert mixed.returncode == 2, mixed.stderr
    assert f"{out} holds rows of one task each (<CAPTION>: fields task and caption)" in mixed.stderr
    assert "Add a task to it with a run of that task alone (one --task), or write" in mixed.stderr
    assert (out.read_bytes(), table.read_bytes()) == before
    assert not tmp_files(tmp_path)
    # A file of several-task rows refuses a one-task run the same way, naming the tasks that wrote it.
    several = tmp_path / "several.jsonl"
    row = {"source": str(root), "key": "x.png", "tasks": ["<CAPTION>", "<GENERATE_TAGS>"], "caption": "a"}
    several.write_text(
        json.dumps({**row, "generate_tags": "b", "model": "test:tiny"}) + "\n", encoding="utf-8"
    )
    refused = run(tmp_path, cache, root, *FAST, "--task", "caption", "--jsonl", several, "--dry-run")
    assert refused.returncode == 2, refused.stderr
    assert "Run with the tasks that wrote it (--task caption --task generate_tags)" in refused.stderr


def test_a_killed_folds_temp_file_goes_with_the_next_run_however_young(tmp_path: Path, cache: Path) -> None:
    """kill -9 mid-fold leaves a temp file as big as the table. The next run holds the table's
    lock, so no other run can be folding it: the temp goes at once, not after 15 minutes.
    (Without a lock the age rule stays: tests/unit/test_bulk_stages.py.)"""
    root = tmp_path / "data"
    good_images(root, 1)
    table = tmp_path / "t.parquet"
    killed_fold = aged(tmp_path / ".t.parquet.0123abcd.tmp", 5, b"PAR1 half a table")  # 5 seconds ago
    result = run(tmp_path, cache, root, *FAST, "--parquet", table)
    assert result.returncode == 0, result.stderr
    assert not killed_fold.exists()
    assert pq.read_table(table).num_rows == 1
    assert not tmp_files(tmp_path)


# --- Parquet and WebDataset inputs ---------------------------------------------------------------


def webdataset_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as shard:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                shard.addfile(info, io.BytesIO(data))


def test_parquet_and_webdataset_inputs(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    datas = {f"s{n}": picture(100 + n, fmt="JPEG" if n % 2 else "PNG") for n in range(5)}
    for key, data in datas.items():
        (folder / f"{key}.png").write_bytes(data)
    keys = [*datas, "empty-row", "garbage-row"]
    images = [*datas.values(), None, b"\x00garbage"]
    pq.write_table(pa.table({"__key__": keys, "jpg": images}), tmp_path / "bytes.parquet")
    hf = [{"bytes": data, "path": f"{key}.png"} for key, data in datas.items()]
    pq.write_table(pa.table({"image": hf, "key": list(datas)}), tmp_path / "hf.parquet")
    paths = [f"files/{key}.png" for key in datas]
    pq.write_table(pa.table({"file_name": paths}), tmp_path / "paths.parquet")
    samples = [
        (f"shard/{key}", {"txt": b"a label", "png": data, "json": b"{}"}) for key, data in datas.items()
    ]
    samples.insert(2, ("shard/no-image", {"txt": b"only text"}))
    samples.append(("shard/bad-member", {"jpg": b"\xff\xd8 not really"}))
    webdataset_shard(tmp_path / "good.tar", samples)
    whole = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])
    out = tmp_path / "rows.jsonl"
    inputs: list[str | Path] = [
        folder,
        "bytes.parquet",
        "hf.parquet",
        "paths.parquet",
        "good.tar",
        "truncated.tar",
    ]
    result = subprocess.run(
        caption_command(*inputs, *FAST, "--jsonl", out, "--cache-dir", cache, "--log-level", "warning"),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    rows = jsonl_rows(out)
    truth = {row["key"].removesuffix(".png"): row["caption"] for row in rows if row["source"] == str(folder)}
    assert len(truth) == 5 and all(truth.values())

    def captions(source: str) -> dict[str, str]:
        return {row["key"]: row["caption"] for row in rows if row["source"] == source and "error" not in row}

    assert captions("bytes.parquet") == truth
    assert {key: text for key, text in captions("hf.parquet").items()} == truth
    assert {Path(key).stem: text for key, text in captions("paths.parquet").items()} == truth
    assert {key.removeprefix("shard/"): text for key, text in captions("good.tar").items()} == truth
    partial = captions("truncated.tar")
    assert (
        partial and len(partial) < 5 and all(truth[k.removeprefix("shard/")] == v for k, v in partial.items())
    )
    errors = {(row["source"], row["key"]): row["error"] for row in rows if "error" in row}
    assert "no image bytes" in errors[("bytes.parquet", "empty-row")]
    assert "the stored image is not in a supported image format" in errors[("bytes.parquet", "garbage-row")]
    assert "no jpg/jpeg/png/webp member" in errors[("good.tar", "shard/no-image")]
    assert "the stored image" in errors[("good.tar", "shard/bad-member")]  # no "Invalid image data: "
    assert any(source == "truncated.tar" and "truncated" in error for (source, _), error in errors.items())


# --- dry run, limit, usage -----------------------------------------------------------------------


def test_dry_run_lists_and_writes_nothing_and_limit_stops_after_n(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    images = sorted(good_images(root, 6))
    sidecar(images[0]).write_text("already here", encoding="utf-8")
    sidecar(images[1]).write_text("  \n", encoding="utf-8")  # empty: what a failed run used to leave
    crashed = caption_temp(root, "0123456789abcdef", OLD)  # what a kill -9 left
    writing = caption_temp(root, "fedcba9876543210", YOUNG)  # maybe another run's write now
    lookalike = aged(root / ".vision-caption.0123456789abcdef.tmp.mine", OLD)
    before = sorted(root.rglob("*"))
    result = run(tmp_path, cache, root, *FAST, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = sorted(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(root.rglob("*")) == before
    assert [line[1] for line in lines if line[0] == "skip"] == [str(images[0])]
    assert sorted(line[1] for line in lines if line[0] == "caption") == sorted(map(str, images[1:]))
    assert "5 to caption, 1 skipped" in result.stderr

    limited = run(tmp_path, cache, root, *FAST, "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert "captioned 2, " in limited.stderr and "failed 0" in limited.stderr
    assert not crashed.exists() and writing.exists() and lookalike.exists()  # only the crash's own
    assert sum(1 for image in images if sidecar(image).exists() and sidecar(image).read_text().strip()) == 3


def test_a_folder_given_twice_or_inside_another_is_captioned_once(tmp_path: Path, cache: Path) -> None:
    # `caption data data/sub` (or a folder named twice, or through a symlink) must not caption
    # the same images twice: in append mode each caption file would get the caption twice.
    root = tmp_path / "data"
    images = sorted(good_images(root, 6))
    for image in images:
        sidecar(image).write_text("old", encoding="utf-8")
    (tmp_path / "same").symlink_to(root)
    jsonl = tmp_path / "out.jsonl"
    inputs = (root, root / "sub", root, tmp_path / "same", images[0])
    result = run(tmp_path, cache, *inputs, *FAST, "--mode", "append", "--jsonl", jsonl, "--sidecars")
    assert result.returncode == 0, result.stderr
    assert f"captioned {len(images)}, skipped 0" in result.stderr
    assert f"{root / 'sub'} is inside {root} (also given): its images are captioned once" in result.stderr
    # an image is no folder: "its images" was said of it too
    assert f"{images[0]} is inside {root} (also given): it is captioned once, as part of" in result.stderr
    assert (
        f"{root} is given twice" in result.stderr and f"{tmp_path / 'same'} is the same as" in result.stderr
    )
    rows = jsonl_rows(jsonl)
    assert sorted(row["key"] for row in rows) == sorted(
        image.relative_to(root).as_posix() for image in images
    )
    captions = {root / row["key"]: row["caption"] for row in rows}
    for image in images:
        assert sidecar(image).read_text(encoding="utf-8") == f"old {captions[image]}"


def test_hidden_names_in_a_folder_are_left_out_but_taken_when_given_themselves(
    tmp_path: Path, cache: Path
) -> None:
    """A folder's hidden files and folders are no part of it (Jupyter checkpoints, thumbnail
    caches), also in --dry-run and its counts; a hidden folder or image given as an input of its
    own is captioned, and not left out as "inside" the folder that does not list it."""
    root = hidden_names.make_tree(tmp_path / "data")
    result = run(tmp_path, cache, root, *FAST, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == [
        str(root / name) for name in hidden_names.VISIBLE
    ]
    assert "2 to caption, 0 skipped" in result.stderr

    given = (root, root / ".ipynb_checkpoints", root / ".hidden.jpg")
    result = run(tmp_path, cache, *given, *FAST)
    assert result.returncode == 0, result.stderr
    assert "captioned 4, skipped 0" in result.stderr and "also given" not in result.stderr
    added = hidden_names.files_below(root) - {*hidden_names.VISIBLE, *hidden_names.HIDDEN_IMAGES}
    assert added == {
        *hidden_names.HIDDEN_LINKS,
        "a.txt",
        "sub/b.txt",
        ".ipynb_checkpoints/a-checkpoint.txt",
        ".hidden.txt",
    }


def test_dry_run_lines_stay_whole_for_names_with_line_breaks_and_tabs(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "new\nline.png").write_bytes(picture(1))
    (root / "tab\tname.png").write_bytes(picture(2))
    (root / "broken\nlink.png").symlink_to(root / "missing.png")
    result = run(tmp_path, cache, root, *FAST, "--dry-run")
    assert result.returncode == 1, result.stderr  # the broken link
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert sorted(lines) == [
        ["caption", f"{root}/new\\nline.png", "<MORE_DETAILED_CAPTION>"],
        ["caption", f"{root}/tab\\tname.png", "<MORE_DETAILED_CAPTION>"],
        ["fail", f"{root}/broken\\nlink.png", f"broken symlink (points to {root}/missing.png)"],
    ]


def test_usage_errors_exit_2_with_a_message(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    good_images(root, 1)
    webdataset_shard(tmp_path / "s.tar", [("k", {"png": picture(1)})])
    (tmp_path / "list.jsonl").write_text(json.dumps(str(next(root.rglob("*.*")))) + "\n", encoding="utf-8")
    cases = [
        ((tmp_path / "missing",), "no such file"),
        ((root, "--jsonl", tmp_path / "no-folder" / "out.jsonl"), "does not exist"),
        ((root, "--parquet", root), "is a folder"),
        ((tmp_path / "s.tar",), "--jsonl FILE or --parquet FILE"),
        ((root, "--task", "paint_me_a_picture"), "Valid prompts"),
        ((root, "--ext", "png"), "image extension"),
        ((tmp_path / "list.jsonl", "--jsonl", tmp_path / "list.jsonl"), "is also an input"),
        ((tmp_path / "s.tar", "--parquet", tmp_path / "s.tar"), "is also an input"),
        ((root, "--log-file", tmp_path), "log_file"),
    ]
    for args, message in cases:
        result = run(tmp_path, cache, *args, *FAST)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_image_column_naming_the_captions_is_bad_usage_as_in_train(tmp_path: Path, cache: Path) -> None:
    # Each row used to fail with "no such file", its caption escaped on one line: one per row.
    # The check is train's (vision_server.parquet_images.paths_problem), exit 2 as there.
    root = tmp_path / "data"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in good_images(root, 2))
    texts = ["photo cat\nsecond line", "photo dog"]
    table = tmp_path / "set.parquet"
    pq.write_table(pa.table({"file": files, "text": texts}), table)
    out = tmp_path / "out.jsonl"
    result = run(tmp_path, cache, table, *FAST, "--image-column", "text", "--jsonl", out, "--sidecars")
    assert result.returncode == 2, result.stderr
    said = "column 'text' holds no image paths: none of its 2 values is an existing file"
    assert f"--image-column 'text': {table}: {said} (the first is 'photo cat second line')" in result.stderr
    assert "no such file" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(root.rglob("*.txt"))  # nothing written


def test_a_caption_file_or_a_list_of_nothing_given_as_an_input_is_bad_usage(
    tmp_path: Path, cache: Path
) -> None:
    # `vision-server caption data/*` after a first run takes data/cat.txt as a list of paths: each
    # caption line used to fail as "no such file", one per caption file, and the run went on.
    root = tmp_path / "data"
    (image,) = good_images(root, 1)
    caption = image.with_suffix(".txt")
    caption.write_text("a photo of a cat", encoding="utf-8")
    rows = tmp_path / "rows.jsonl"  # a JSONL of captions, not of paths
    rows.write_text('{"source": "data", "key": "a.png", "caption": "x"}\n' * 2, encoding="utf-8")
    moved = tmp_path / "moved.txt"  # a list whose images are gone
    moved.write_text("gone/a.png\ngone/b.png\n", encoding="utf-8")
    for listing, said in (
        (caption, "none of its lines names an existing file (1 line; the first is 'a photo of a cat')"),
        (rows, "none of its lines names an existing file (2 lines; the first is"),
        (moved, "none of its lines names an existing file (2 lines; the first is 'gone/a.png')"),
    ):
        result = run(tmp_path, cache, image, listing, *FAST)
        assert result.returncode == 2, result.stderr
        assert f"{listing}: {said}" in result.stderr and "Give the images or their folder" in result.stderr
        assert "no such file" not in result.stderr and "Traceback" not in result.stderr
        assert caption.read_text(encoding="utf-8") == "a photo of a cat"  # nothing written
    # a list with one line that names an image is read as ever, its missing lines failing alone
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"gone/a.png\n{image}\n", encoding="utf-8")
    result = run(tmp_path, cache, mixed, *FAST, "--dry-run")
    assert result.returncode == 1, result.stderr
    assert f"fail\t{tmp_path}/gone/a.png\tno such file" in result.stdout, result.stdout
    assert f"skip\t{image}\talready captioned" in result.stdout, result.stdout


def test_help_lists_only_offline_options(tmp_path: Path) -> None:
    result = subprocess.run(caption_command("--help"), env=cli_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0
    for present in ("--model", "--adapter", "--device", "--max-batch-size", "--num-beams", "--cache-dir",
                    "--log-level", "--jsonl", "--parquet", "--mode", "--dry-run", "--limit"):  # fmt: skip
        assert present in result.stdout, present
    for absent in ("--host", "--port", "--api-key", "--ssl-cert", "--cors-origin", "--idle-timeout"):
        assert absent not in result.stdout, absent
    # the shared settings are described as they work offline: no requests, lanes or status codes
    text = " ".join(result.stdout.split())
    for server_words in ("The model to serve", "requests naming none", "more get 503", "(413 above"):
        assert server_words not in text, server_words
    assert "The model to caption with" in text and "the readers wait for room" in text


def test_images_of_a_path_list_sharing_a_caption_file_are_refused(tmp_path: Path, cache: Path) -> None:
    # A list naming a.jpg and a.png used to write a.txt twice, the second caption over the first.
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("a.jpg", "a.png", "b.png")):
        (root / name).write_bytes(picture(seed))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'a.jpg'}\n{root / 'b.png'}\n{root / 'a.png'}\n", encoding="utf-8")
    result = run(tmp_path, cache, listing, *FAST)
    assert result.returncode == 1, result.stderr
    assert not (root / "a.txt").exists() and (root / "b.txt").read_text(encoding="utf-8").strip()
    for image, other in (("a.jpg", "a.png"), ("a.png", "a.jpg")):
        assert f"{root / image}: shares its caption file a.txt with {root / other}; neither" in result.stderr
    assert "captioned 1, " in result.stderr and "failed 2" in result.stderr


def test_a_rerun_with_another_model_captions_again_into_the_same_jsonl(tmp_path: Path, cache: Path) -> None:
    # Resuming went by image and task only, so a second model's run skipped every image.
    root = tmp_path / "data"
    images = sorted(good_images(root, 3))
    jsonl = tmp_path / "out.jsonl"
    for model, captioned in (("one=test:tiny", 3), ("two=test:tiny", 3)):  # unit tests: the rest
        command = caption_command(
            root, "--model", model, *FAST_OPTIONS, "--jsonl", jsonl, "--cache-dir", cache
        )
        result = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert f"captioned {captioned}, skipped {3 - captioned}" in result.stderr, (model, result.stderr)
        if model.startswith("two"):
            assert "resuming from the rows of two only; its rows of other models (3 of one)" in result.stderr
    rows = jsonl_rows(jsonl)
    assert [row["model"] for row in rows] == ["one"] * 3 + ["two"] * 3
    assert {row["key"] for row in rows[3:]} == {image.relative_to(root).as_posix() for image in images}


def test_a_rerun_naming_the_adapter_another_way_resumes(
    tmp_path: Path, cache: Path, tiny_adapter_dir: Path
) -> None:
    # Rows held the adapter as typed, so `my-adapter/` and `my-adapter` were two adapters and a
    # rerun captioned everything again; they hold its resolved path now, the same from any folder.
    work = tmp_path / "work"
    shutil.copytree(tiny_adapter_dir, work / "my-adapter")
    root = tmp_path / "data"
    good_images(root, 2)
    jsonl = tmp_path / "out.jsonl"
    runs = ((work, "my-adapter/", 2), (tmp_path, "work/my-adapter", 0))  # unit tests: older rows
    for cwd, spelling, captioned in runs:
        result = run(tmp_path, cache, root, *FAST, "--adapter", spelling, "--jsonl", jsonl, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert f"captioned {captioned}, skipped {2 - captioned}" in result.stderr, (spelling, result.stderr)
    rows = jsonl_rows(jsonl)
    assert len(rows) == 2 and {row["adapter"] for row in rows} == {str((work / "my-adapter").resolve())}


def test_a_rerun_with_nothing_left_loads_no_model_and_knows_a_local_model_typed_another_way(
    tmp_path: Path, cache: Path, tiny_native_dir: Path
) -> None:
    # A rerun of a finished run loaded the model (minutes for a large one) only to skip every
    # image; and rows named an unnamed local model as typed, so `./m/` and `m` did not resume.
    work = tmp_path / "work"
    shutil.copytree(tiny_native_dir, work / "m")
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        (root / name).write_bytes(picture(seed))
    (tmp_path / "shortcut").symlink_to(work)
    typed = f"{tmp_path / 'shortcut'}/m/"  # as an older version wrote it: as typed
    jsonl = tmp_path / "out.jsonl"
    older = {"source": str(root), "key": "a.png", "task": "<MORE_DETAILED_CAPTION>", "caption": "x"}
    jsonl.write_text(json.dumps({**older, "model": typed, "adapter": None}) + "\n", encoding="utf-8")

    def caption(cwd: Path, model: str) -> subprocess.CompletedProcess[str]:
        command = caption_command(
            root, "--model", model, *FAST_OPTIONS, "--jsonl", jsonl, "--cache-dir", cache
        )
        return subprocess.run(
            command, cwd=cwd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600
        )

    # a.png's row names the folder through a symlink: it counts, and the model loads only when
    # b.png, the first image to caption, comes up.
    first = caption(work, "./m/")
    assert first.returncode == 0, first.stderr
    assert "captioned 2, skipped 1, failed 0" in first.stderr
    assert f"loading the model for {root / 'b.png'}, the first image to caption (1 skipped before it)" in (
        first.stderr
    )
    model = str((work / "m").resolve())
    assert [row["model"] for row in jsonl_rows(jsonl)] == [typed, model, model]
    # Now the folder is no model at all: a load would fail (exit 1, "could not be loaded").
    (work / "m" / "config.json").unlink()
    again = caption(tmp_path, "work/m")  # another spelling, from another folder
    assert again.returncode == 0, again.stderr
    assert "captioned 0, skipped 3, failed 0" in again.stderr
    assert "could not be loaded" not in again.stderr and "loading the model" not in again.stderr
    assert len(jsonl_rows(jsonl)) == 3


def test_a_parquet_path_column_picked_on_its_own_naming_no_file_is_bad_usage(
    tmp_path: Path, cache: Path
) -> None:
    # Each row failed with "no such file" (a table moved away from its images, say).
    table = tmp_path / "set.parquet"
    pq.write_table(pa.table({"file_name": ["gone/a.png", "gone/b.png"], "text": ["a", "b"]}), table)
    out = tmp_path / "out.jsonl"
    result = run(tmp_path, cache, table, *FAST, "--jsonl", out)
    assert result.returncode == 2, result.stderr
    said = "column 'file_name' holds no image paths: none of its 2 values is an existing file"
    assert (
        f"{table}: {said} (the first is 'gone/a.png'); relative paths are read from the table's folder"
        in (result.stderr)
    )
    assert "no such file" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_model_that_cannot_load_ends_with_the_summary_and_how_to_go_on(
    tmp_path: Path, cache: Path, tiny_native_dir: Path
) -> None:
    # The model loads when the first image to caption decodes; its load failing printed only
    # "error: ..." and lost the skipped and failed images reported before, and what was left.
    model = tmp_path / "m"
    shutil.copytree(tiny_native_dir, model)
    (model / "config.json").unlink()  # no model any more: planning works, the load fails
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(picture(0))
    (root / "b.png").write_bytes(b"not an image at all")
    (root / "c.png").write_bytes(picture(2))
    jsonl = tmp_path / "out.jsonl"
    done = {"source": str(root), "key": "a.png", "task": "<MORE_DETAILED_CAPTION>", "caption": "done"}
    before = json.dumps({**done, "model": str(model.resolve()), "adapter": None}) + "\n"
    jsonl.write_text(before, encoding="utf-8")
    result = run(tmp_path, cache, root, "--model", model, *FAST_OPTIONS, "--jsonl", jsonl)
    err = result.stderr
    assert result.returncode == 1, err
    assert "Traceback" not in err
    assert "captioned 0, skipped 1, failed 1 in " in err, err
    assert f"failed:\n  {root / 'b.png'}: the file is not in a supported image format" in err, err
    # said once, in the summary, as the command's other errors are: "error: " and a lower-case word
    assert "error: the model could not be loaded: " in err and err.count("has no config.json") == 1, err
    assert "1 of the 3 images is not captioned yet: run the same command again once the model loads" in err
    assert err.index("captioned 0,") < err.index("error: the model") < err.index("1 of the 3 images")
    text = jsonl.read_text(encoding="utf-8")  # the row there stays; b.png's failure row is whole
    assert text.startswith(before) and text.endswith("\n"), text
    assert [(row["key"], row["caption"]) for row in jsonl_rows(jsonl)] == [("a.png", "done"), ("b.png", None)]
    # a new output that got no row is not left behind, empty
    (root / "b.png").unlink()
    fresh = tmp_path / "fresh.jsonl"
    again = run(tmp_path, cache, root, "--model", model, *FAST_OPTIONS, "--jsonl", fresh)
    assert again.returncode == 1 and "2 of the 2 images are not captioned yet" in again.stderr, again.stderr
    assert not fresh.exists()


def test_an_adapter_gone_when_the_model_is_built_ends_with_the_summary_like_a_failed_load(
    tmp_path: Path, cache: Path, tiny_adapter_dir: Path
) -> None:
    # The model (and so its adapter) is built when the first image to caption comes up, after
    # planning checked it: an adapter removed in between stopped the run as bad usage (exit 2),
    # without the summary of the images already skipped or what was left.
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        (root / name).write_bytes(picture(seed))
    sidecar(root / "a.png").write_text("done", encoding="utf-8")
    gate = tmp_path / "gate"
    gate.mkdir()
    args = (root, *FAST, "--adapter", adapter, "--cache-dir", cache)
    env = {**cli_env(tmp_path), "CAPTION_GATE": str(gate), "CAPTION_GATE_AT": "build"}
    command = gated_caption_command(*args)
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            deadline = time.monotonic() + 300
            while not (gate / "build.entered").exists():  # b.png came up: the model is being built
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            (adapter / "adapter_config.json").unlink()
        finally:
            (gate / "build.open").touch()
        code = process.wait(300)
        err = process.stderr.read() if process.stderr else ""
    assert code == 1, err
    assert "Traceback" not in err and "Usage:" not in err, err
    assert "captioned 0, skipped 1, failed 0 in " in err, err
    gone = f"model test:tiny: the adapter directory {adapter} has no adapter_config.json"
    assert f"error: the model could not be loaded: {gone}" in err, err
    assert "2 of the 3 images are not captioned yet: run the same command again once the model loads" in err
    assert err.index("captioned 0,") < err.index("error: the model") < err.index("2 of the 3 images")
    # nothing half-written: no caption file, no temporary one
    assert sorted(path.name for path in root.iterdir()) == ["a.png", "a.txt", "b.png", "c.png"]


def test_a_rerun_whose_images_left_do_not_decode_loads_no_model(
    tmp_path: Path, cache: Path, tiny_native_dir: Path
) -> None:
    # A rerun over a dataset with a truncated download loaded the model (minutes for a large
    # one) every time, only to report that file again: the load now waits for an image that
    # decodes. A model folder without config.json shows whether a load was tried (it fails).
    model = tmp_path / "m"
    shutil.copytree(tiny_native_dir, model)
    (model / "config.json").unlink()
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(picture(0))
    sidecar(root / "a.png").write_text("done", encoding="utf-8")
    (root / "b.png").write_bytes(picture(1)[:60])  # truncated
    (root / "c.png").write_bytes(b"")
    result = run(tmp_path, cache, root, "--model", model, *FAST_OPTIONS)
    assert result.returncode == 1, result.stderr
    assert "captioned 0, skipped 1, failed 2 in " in result.stderr, result.stderr
    assert f"{root / 'b.png'}: cannot decode the image" in result.stderr
    assert "could not be loaded" not in result.stderr and "Traceback" not in result.stderr


def test_a_pipe_made_where_a_caption_belongs_while_captioning_fails_the_image_in_its_own_words(
    tmp_path: Path, cache: Path
) -> None:
    # A pipe found when the run plans the image fails it as "a.txt is not a regular file (...)";
    # one that appears while the model captions it failed as "cannot write the caption (a.txt
    # is not a regular file (...))". Now the same words either way, as for a read-only caption.
    # (In skip mode the pipe counts as a caption there, left alone: the image is skipped.)
    root = tmp_path / "data"
    good_images(root, 1)
    image = next(root.iterdir())
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**cli_env(tmp_path), "CAPTION_GATE": str(gate), "CAPTION_GATE_AT": "write"}
    command = gated_caption_command(root, *FAST, "--mode", "overwrite", "--cache-dir", cache)
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            deadline = time.monotonic() + 300
            while not (gate / "write.entered").exists():  # captioned, about to be written
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            os.mkfifo(sidecar(image))
        finally:
            (gate / "write.open").touch()
        code = process.wait(120)
        err = process.stderr.read() if process.stderr else ""
    assert code == 1, err
    reason = f"{sidecar(image).name} is not a regular file (a pipe, socket or device), not a caption file"
    assert any(line.strip().endswith(f"{image.name}: {reason}") for line in err.splitlines()), err
    assert "cannot write the caption" not in err and "Traceback" not in err, err
    assert stat.S_ISFIFO(sidecar(image).lstat().st_mode)


def test_a_second_ctrl_c_quits_at_once_and_says_how_to_go_on(tmp_path: Path, cache: Path) -> None:
    # The second Ctrl+C ended the process without a word after "press Ctrl+C again to quit
    # now": no summary, nothing about what was kept or that a rerun resumes. The stop waits for
    # the caption being written, which the test holds (a slow batch on the model could end
    # between the two signals, and the run with it).
    root = tmp_path / "data"
    good_images(root, 6)
    gate = tmp_path / "gate"
    gate.mkdir()
    args = (root, *FAST, "--max-batch-size", "2", "--workers", "1", "--cache-dir", cache)
    env = {**cli_env(tmp_path), "CAPTION_GATE": str(gate), "CAPTION_GATE_AT": "write"}

    def default_sigint() -> None:  # as from a terminal, even when the test runner ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        gated_caption_command(*args), env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    ) as process:
        try:
            deadline = time.monotonic() + 300
            while not (gate / "write.entered").exists():  # the first caption is being written
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            process.send_signal(signal.SIGINT)
            assert process.stderr is not None
            said: list[
                str
            ] = []  # two signals sent at once may arrive as one: the second goes once the first is seen
            while not said or not said[-1].startswith("stopping: "):
                said.append(process.stderr.readline())
                assert said[-1], "".join(said)
            process.send_signal(signal.SIGINT)  # the stop is waiting for the write the gate holds
            code = process.wait(120)
            stderr = "".join(said) + process.stderr.read()
        finally:
            (gate / "write.open").touch()  # a run that did not quit finishes instead of waiting
    assert code == 130, stderr
    assert "quit at once: the captions written so far are kept; run the same command again" in stderr
    assert "Traceback" not in stderr
    assert not list(root.rglob("*.txt"))  # the held write never happened
