"""The rules the three dataset tools share, checked through each of them as a real process.

``vision-server caption`` (offline), ``vision-client folder`` and the bash folder script
(``clients/vision-caption-folder-images.sh``) run on the same kind of folder and must do the same
thing with it. The clients talk to the module's real ``vision-server serve --model test:tiny``;
the offline command loads the same tiny model itself.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import hidden_names, paths
from tests.support.api import tiny_cache_dir
from tests.support.bulk_data import caption_command, cli_env
from tests.support.images import save as save_image
from tests.support.processes import free_port, tiny_server
from tests.support.stand_in import StandIn
from vision_server.bulk.command import CaptionRequest, _outputs
from vision_server.bulk.records import Record
from vision_server.settings import Settings

TOOLS = ("vision-server caption", "vision-client folder", "bash script")
FOLDER_SCRIPT = paths.REPO / "clients" / "vision-caption-folder-images.sh"
VISION_CLIENT = Path(sys.executable).with_name("vision-client")


def run_tool(
    tool: str,
    folder: Path,
    *,
    url: str,
    cache: Path,
    tmp: Path,
    options: tuple[str, ...] = (),
    model: str = "test:tiny",
    ext: str = "txt",
) -> subprocess.CompletedProcess[str]:
    """One folder run of ``tool``: the CAPTION task, ``.<ext>`` caption files beside the images;
    ``model`` is the offline command's ``--model`` (the clients use the server's)."""
    if tool == "vision-server caption":
        command = caption_command(
            folder, "--model", model, "--task", "CAPTION", "--max-new-tokens", "8",
            "--cache-dir", cache, "--log-level", "warning", "--ext", ext, *options,
        )  # fmt: skip
        env = cli_env(tmp)
    else:
        command, env = client_command(tool, url, folder, folder_options=options, ext=ext)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)


def client_command(
    tool: str,
    url: str,
    folder: Path,
    client_options: Sequence[str] = (),
    folder_options: Sequence[str] = (),
    *,
    task: str = "CAPTION",
    ext: str = "txt",
    model: str | None = None,
    jobs: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line of a folder client (``vision-client folder`` or the bash script) that
    captions ``folder`` with ``task`` through the server at ``url``, and its environment, free
    of the caller's ``VISION_*`` settings. ``client_options`` are options of the client itself
    (``--retries``, ``--timeout``: before ``folder`` for ``vision-client``), ``folder_options``
    those of the folder run; ``model`` is ``--model`` (``VISION_MODEL`` for the script), ``jobs``
    the requests in flight (``--concurrency`` / ``--jobs``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    if tool == "vision-client folder":
        named = ["--model", model] if model is not None else []
        parallel = ["--concurrency", str(jobs)] if jobs is not None else []
        command = [str(VISION_CLIENT), "--url", url, *client_options, *named, "folder", str(folder)]
        command += ["--task", task, "--ext", ext, *parallel, *folder_options]
        return command, env
    if model is not None:
        env["VISION_MODEL"] = model
    parallel = ["--jobs", str(jobs)] if jobs is not None else []
    command = ["bash", str(FOLDER_SCRIPT), "--url", url, *client_options, *parallel, *folder_options]
    return [*command, task, ext, str(folder)], env


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cache_dir(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Images that would share a caption file


@pytest.mark.parametrize("tool", TOOLS)
def test_images_sharing_a_caption_file_are_all_failed_and_none_is_captioned(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """a.jpg + a.png (and b.jpg + b.png + b.gif, whose b.txt already exists) share a caption file:
    none of them is captioned, each is reported with the others and the caption file's name, the
    existing b.txt stays as it is, and a rerun reports them again (it never skips them)."""
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("a.jpg", "a.png", "b.gif", "b.jpg", "b.png", "c.png")):
        save_image(root / name, seed)
    (root / "b.txt").write_text("written by hand for one of the b images", encoding="utf-8")
    pair = "neither is captioned, rename one of them"
    group = "none is captioned, rename all but one"
    expected = {
        "a.jpg": f"shares its caption file a.txt with a.png; {pair}",
        "a.png": f"shares its caption file a.txt with a.jpg; {pair}",
        "b.gif": f"shares its caption file b.txt with b.jpg, b.png; {group}",
        "b.jpg": f"shares its caption file b.txt with b.gif, b.png; {group}",
        "b.png": f"shares its caption file b.txt with b.gif, b.jpg; {group}",
    }
    for attempt in ("first run", "rerun"):
        result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
        assert result.returncode == 1, (attempt, result.stderr[-3000:])
        for name, reason in expected.items():
            assert f"{name}: {reason}" in result.stderr, (attempt, name, result.stderr[-3000:])
        assert not (root / "a.txt").exists(), attempt
        assert (root / "b.txt").read_text(encoding="utf-8") == "written by hand for one of the b images"
        assert (root / "c.txt").read_text(encoding="utf-8").strip(), attempt  # the rest is captioned


@pytest.mark.parametrize("tool", TOOLS)
def test_stems_that_differ_in_case_alone_are_both_captioned_on_a_case_sensitive_disk(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """b.jpg + B.png write b.txt and B.txt: two files on this disk (ext4), so both are
    captioned. Each tool asks the folder's file system; on macOS or Windows they would clash
    (tests/unit/test_case_folding.py gives the tools that answer)."""
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("b.jpg", "B.png", "c.png")):
        save_image(root / name, seed)
    before = {path.name for path in root.iterdir()}
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shares its caption file" not in result.stderr
    for caption in ("b.txt", "B.txt", "c.txt"):
        assert (root / caption).read_text(encoding="utf-8").strip(), caption
    assert {path.name for path in root.iterdir()} == before | {"b.txt", "B.txt", "c.txt"}  # no probe left


# ---------------------------------------------------------------------------------------------
# Hidden files and folders


@pytest.mark.parametrize("tool", TOOLS)
def test_hidden_files_and_folders_below_the_root_are_no_part_of_the_dataset_in_every_tool(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """A name starting with "." below the root is not captioned, not entered, not reported:
    Jupyter checkpoints, thumbnail caches, the trash, a dot-named symlink (every tool captioned
    them as training images; kohya-ss skips them). The root is hidden itself (``.data``): only
    names below it count, so its own images are captioned."""
    root = hidden_names.make_tree(tmp_path / ".data")
    before = hidden_names.files_below(root)
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hidden_names.files_below(root) == before | {"a.txt", "sub/b.txt"}
    for name in (*hidden_names.HIDDEN_IMAGES, *hidden_names.HIDDEN_LINKS):
        assert Path(name).name not in result.stderr + result.stdout, (name, result.stderr[-3000:])
    for caption in ("a.txt", "sub/b.txt"):
        assert (root / caption).read_text(encoding="utf-8").strip(), caption


# ---------------------------------------------------------------------------------------------
# How a failed image is reported


@pytest.mark.parametrize("tool", TOOLS)
def test_an_empty_image_file_and_a_refused_image_read_alike_in_every_summary(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """An image file of 0 bytes is "<image>: the file is empty (0 bytes)" in every tool (they
    said it three ways, one naming the file twice); an image the server refuses is "<image>:
    HTTP 400: <the server's message>" in both clients (vision-client folder wrote "<message>
    (HTTP 400)"). The offline command decodes the files itself, so no HTTP there."""
    root = tmp_path / "data"
    root.mkdir()
    save_image(root / "good.png", 1)
    (root / "empty.png").write_bytes(b"")
    (root / "broken.png").write_bytes(b"not an image at all")
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert any(line.endswith("empty.png: the file is empty (0 bytes)") for line in lines), result.stderr[
        -3000:
    ]
    if tool != "vision-server caption":
        assert any("broken.png: HTTP 400: Invalid image data" in line for line in lines), result.stderr[
            -3000:
        ]
    assert (root / "good.txt").read_text(encoding="utf-8").strip()
    assert not (root / "empty.txt").exists() and not (root / "broken.txt").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_entries_named_like_images_that_are_not_image_files_fail_with_their_reason_in_every_tool(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """A broken symlink, a symlink loop and a FIFO named like images fail, each with the same
    reason in every tool (the bash script left them out without a word), and a macOS ``._name``
    resource fork is no image to any of them (the bash script captioned it: it is a real image
    here, so a tool that takes it sends it and writes ``._fine.txt``)."""
    root = tmp_path / "data"
    root.mkdir()
    save_image(root / "fine.png", 1)
    save_image(root / "._fine.png", 2)
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(root / "pipe.png")
    (root / "folder.png").mkdir()  # a folder named like an image is no entry at all
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    for name, reason in (
        ("gone.jpg", "broken symlink (points to nowhere.jpg)"),
        ("loop.jpg", "symlink loop"),
        ("pipe.png", "not a regular file"),
    ):
        assert any(line.endswith(f"{name}: {reason}") for line in lines), (name, result.stderr[-3000:])
    assert "._fine" not in result.stderr and "folder.png" not in result.stderr, result.stderr[-3000:]
    assert (root / "fine.txt").read_text(encoding="utf-8").strip()
    assert sorted(path.name for path in root.iterdir()) == [
        "._fine.png", "fine.png", "fine.txt", "folder.png", "gone.jpg", "loop.jpg", "pipe.png"
    ]  # fmt: skip


@pytest.mark.parametrize("tool", TOOLS)
def test_a_caption_name_too_long_for_the_file_system_fails_that_image_before_it_is_sent(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """``--ext caption`` beside a 248-byte stem names a 256-byte caption file, which the file
    system cannot hold: that image alone fails, in every tool with the same words saying what to
    do (the bash script sent it, then failed with mv's "File name too long"), and is not sent."""
    root = tmp_path / "data"
    root.mkdir()
    save_image(root / f"{'a' * 248}.png", 1)
    save_image(root / "b.png", 2)
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path, ext="caption")
    assert result.returncode == 1, result.stderr[-3000:]
    reason = (
        f"{'a' * 248}.png: the name of its caption file (256 bytes) is too long for the file system; "
        "rename the image to a shorter name"
    )
    assert any(line.endswith(reason) for line in result.stderr.splitlines()), result.stderr[-3000:]
    assert "mv:" not in result.stderr and "[1/2]" not in result.stderr, result.stderr[-3000:]
    assert (root / "b.caption").read_text(encoding="utf-8").strip()
    assert sorted(path.name for path in root.iterdir()) == sorted([f"{'a' * 248}.png", "b.png", "b.caption"])


@pytest.mark.parametrize("mode", ["skip", "overwrite"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_pipe_where_a_caption_file_belongs_fails_that_image_and_hangs_no_tool(
    tool: str, mode: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """A named pipe as ``a.txt`` (an unpacked archive can hold one): reading it waits for a
    writer forever, so ``vision-client folder`` hung at its skip check. Every tool now fails
    that image with the same words, leaves the pipe as it is and captions the rest."""
    root = tmp_path / "data"
    root.mkdir()
    save_image(root / "a.png", 1)
    save_image(root / "b.png", 2)
    os.mkfifo(root / "a.txt")
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path, options=("--mode", mode))
    assert result.returncode == 1, result.stderr[-3000:]
    reason = "a.png: a.txt is not a regular file (a pipe, socket or device), not a caption file"
    assert any(line.endswith(reason) for line in result.stderr.splitlines()), result.stderr[-3000:]
    assert stat.S_ISFIFO((root / "a.txt").lstat().st_mode)
    assert (root / "b.txt").read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------------------------------------
# Replacing a caption file: its mode, a read-only one, a symlinked one


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mode", ["overwrite", "append", "prepend", "skip"])
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_replaces_a_caption_file_by_the_same_rules(
    tool: str, mode: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """The rules of ``captionfiles.write_atomic``, through every tool (the tests run as root,
    whom no mode stops, so the read-only rule must go by the mode bits):

    * a caption file the user made read-only (0444) is not replaced: that image alone fails,
      "ro.txt is read-only; make it writable (chmod u+w) to let it be replaced", the rest go on;
    * a rewritten caption keeps its mode (0640 stays 0640, not the umask's);
    * a symlinked caption is replaced by a plain file with a new file's mode, and the file it
      points to (read-only, in a read-only folder, as git-annex keeps them) is left as it was.

    In skip mode the files are empty (no caption yet): the same rules hold for the write. In
    append and prepend mode the old text is taken without its UTF-8 BOM and the white space
    around it (merge_caption). The bash script replaced the read-only file, reset the 0640 one
    to the umask's mode, and kept the BOM and leading blanks (in the middle, when prepending)."""
    root = tmp_path / "data"
    store = tmp_path / "store"
    root.mkdir()
    store.mkdir()
    old = {"skip": "", "overwrite": "old words"}.get(mode, "\ufeff \t old words \n")
    for seed, name in enumerate(("ro.png", "shared.png", "linked.png", "new.png")):
        save_image(root / name, seed)
    (root / "ro.txt").write_text(old, encoding="utf-8")
    (root / "ro.txt").chmod(0o444)
    (root / "shared.txt").write_text(old, encoding="utf-8")
    (root / "shared.txt").chmod(0o640)
    (store / "linked.txt").write_text(old, encoding="utf-8")
    (store / "linked.txt").chmod(0o444)
    (root / "linked.txt").symlink_to(store / "linked.txt")
    store.chmod(0o555)
    try:
        options = ("--mode", mode)
        result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path, options=options)
    finally:
        store.chmod(0o755)
    assert result.returncode == 1, result.stderr[-3000:]
    # Every tool's summary says it in the same words ("ro.png: cannot write the caption (<the
    # reason>)" in vision-server caption before).
    reason = "ro.txt is read-only; make it writable (chmod u+w) to let it be replaced"
    lines = result.stderr.splitlines()
    assert any(line.endswith(f"ro.png: {reason}") for line in lines), result.stderr[-3000:]
    assert (root / "ro.txt").read_text(encoding="utf-8") == old
    assert (root / "ro.txt").stat().st_mode & 0o777 == 0o444
    new_mode = 0o666 & ~current_umask()
    for name, kept in (("shared.txt", 0o640), ("linked.txt", new_mode), ("new.txt", new_mode)):
        path = root / name
        assert not path.is_symlink(), name
        text = path.read_text(encoding="utf-8")
        assert text.strip() and text != old, name
        if mode == "append" and name != "new.txt":
            assert text.startswith("old words "), (name, text)
        if mode == "prepend" and name != "new.txt":
            assert text.endswith(" old words") and "\ufeff" not in text, (name, text)
        assert path.stat().st_mode & 0o777 == kept, (name, oct(path.stat().st_mode))
    assert (store / "linked.txt").read_text(encoding="utf-8") == old
    assert (store / "linked.txt").stat().st_mode & 0o777 == 0o444
    assert not list(root.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Line breaks in a caption

# A caption with line breaks of every kind; the real tiny model only ever says words on one line,
# so the clients get this one from the stand-in server, and the offline command's writers get it
# as the engine hands captions to them.
MULTI_LINE = "A cat.\nIt sleeps on a red sofa.\r\n\r\nThe end.\rReally."
ONE_LINE = "A cat. It sleeps on a red sofa.  The end. Really."


def test_a_caption_with_line_breaks_is_one_line_in_every_caption_file_and_verbatim_in_rows(
    cache: Path, tmp_path: Path
) -> None:
    """Every tool writes a caption file on one line (each line break becomes a space; trainers
    read caption files by lines), the same bytes from each; JSONL rows keep the caption as is."""
    files: dict[str, bytes] = {}
    with StandIn(caption=MULTI_LINE) as stand_in:
        for tool in ("vision-client folder", "bash script"):
            root = tmp_path / tool.replace(" ", "-")
            save_image(root / "cat.png", 1)
            result = run_tool(
                tool, root, url=stand_in.url, cache=cache, tmp=tmp_path, options=("--prefix", "ohwx, ")
            )
            assert result.returncode == 0, result.stderr[-3000:]
            files[tool] = (root / "cat.txt").read_bytes()
        jsonl_root = tmp_path / "jsonl"
        save_image(jsonl_root / "cat.png", 1)
        jsonl = tmp_path / "client.jsonl"
        result = run_tool(
            "vision-client folder",
            jsonl_root,
            url=stand_in.url,
            cache=cache,
            tmp=tmp_path,
            options=("--jsonl", str(jsonl)),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert [json.loads(line)["caption"] for line in jsonl.read_text("utf-8").splitlines()] == [MULTI_LINE]

    # vision-server caption: its sidecar and JSONL outputs, given the caption by the pipeline
    root = tmp_path / "offline"
    save_image(root / "cat.png", 1)
    request = CaptionRequest(inputs=(root,), jsonl=tmp_path / "offline.jsonl", sidecars=True, prefix="ohwx, ")
    outputs = _outputs(request, Settings(model=("test:tiny",)), ("<CAPTION>",), sidecars=True)
    record = Record(str(root), "cat.png", path=root / "cat.png")
    for output in outputs:
        output.write(record, {"<CAPTION>": MULTI_LINE}, None)
        output.close()
    files["vision-server caption"] = (root / "cat.txt").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "offline.jsonl").read_text("utf-8").splitlines()]
    assert [row["caption"] for row in rows] == ["ohwx, " + MULTI_LINE]

    assert files == {tool: ("ohwx, " + ONE_LINE).encode() for tool in TOOLS}


# ---------------------------------------------------------------------------------------------
# Ctrl+C


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_ctrl_c_exits_130_and_the_summary_counts_the_caption_files_written(
    tool: str, tiny_server_url: str, tmp_path: Path
) -> None:
    """Ctrl+C half-way (SIGINT to the process group, as a terminal sends it): exit 130 and a
    summary whose captioned count is the caption files on disk, with how many images are not
    captioned yet and that the same command resumes. ``vision-client folder`` used to print a
    bare "interrupted"; the bash script left out of "captioned" a caption renamed into place
    just before the signal (test_shell_clients.py lands the signal exactly there)."""
    root = tmp_path / "data"
    for seed in range(150):
        save_image(root / f"img{seed:03d}.png", seed)
    command, env = client_command(tool, tiny_server_url, root, jobs=1)

    def default_sigint() -> None:  # as from a terminal, even when the test runner ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, start_new_session=True
    ) as process:
        deadline = time.monotonic() + 120
        while len(list(root.glob("*.txt"))) < 3:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(60)
        stderr = process.stderr.read() if process.stderr else ""
    written = len(list(root.glob("*.txt")))
    assert code == 130, stderr[-3000:]
    assert 3 <= written < 150, stderr[-3000:]  # it really stopped half-way
    assert f"{written} captioned" in stderr, stderr[-3000:]
    assert f"{150 - written} image(s) not captioned yet" in stderr.replace(" images not", " image(s) not")
    assert " 0 failed" in stderr, stderr[-3000:]
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not list(root.glob(".*.tmp"))


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_sigterm_exits_143_after_the_summary_and_a_rerun_does_the_rest(
    tool: str, tiny_server_url: str, tmp_path: Path
) -> None:
    """SIGTERM to the client's process alone, as ``kill PID``, ``timeout`` and systemd send it
    to an overnight run: the same clean stop as Ctrl+C, exit 143, a summary whose captioned
    count is the caption files on disk, and the same command captions exactly the rest.
    ``vision-client folder`` used to die at once on it, without a summary."""
    root = tmp_path / "data"
    for seed in range(30):
        save_image(root / f"img{seed:03d}.png", seed)
    command, env = client_command(tool, tiny_server_url, root, jobs=1)
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 120
        while len(list(root.glob("*.txt"))) < 3:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        stderr = process.stderr.read() if process.stderr else ""
    written = len(list(root.glob("*.txt")))
    assert code == 143, stderr[-3000:]
    assert 3 <= written < 30, stderr[-3000:]  # it really stopped half-way
    assert f"{written} captioned" in stderr, stderr[-3000:]
    assert f"{30 - written} image(s) not captioned yet" in stderr.replace(" images not", " image(s) not")
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not list(root.glob(".*.tmp"))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list(root.glob("*.txt"))) == 30
    assert f"{written} skipped" in rerun.stderr, rerun.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# A model the server does not serve


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_a_model_the_server_does_not_serve_stops_both_clients_before_any_image(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """``--model nope`` (``VISION_MODEL=nope`` for the script) on a server of one model: that
    server would caption any name with its model, rows would say ``test:tiny`` and no rerun
    naming ``nope`` would ever count them as done. Both clients ask ``/prompts?model=nope``
    first and stop on its 404 before any image with exit 2, the usage error it is (vision-client
    exited 1), writing nothing."""
    root = tmp_path / "data"
    for seed, name in enumerate(("a.png", "b.png")):
        save_image(root / name, seed)
    rows = tmp_path / "rows.jsonl"
    jsonl = ("--jsonl", str(rows)) if tool == "vision-client folder" else ()  # the script has none
    command, env = client_command(tool, tiny_server_url, root, folder_options=jsonl, model="nope")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "HTTP 404: " in result.stderr
    assert "does not serve a model named 'nope'" in result.stderr
    assert "check --url" in result.stderr and ".: check" not in result.stderr  # one sentence
    # The summary of every early stop (the bash script ended with the message alone).
    assert "Stopped early, 2 image(s) not attempted: HTTP 404: " in result.stderr, result.stderr[-3000:]
    assert not rows.exists()
    assert sorted(path.name for path in root.iterdir()) == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------
# A run that stops early: one exit status per cause


@pytest.mark.parametrize(
    ("cause", "status", "reason"),
    [
        ("unreachable", 3, "the server cannot be reached ("),
        ("busy", 5, "the server stays busy or unavailable (HTTP 503: Queue full"),
        # a 502 the server (or a gateway) says itself, in JSON: not a proxy's bare page, which
        # means "no server behind me" (unreachable); vision-client folder failed each image
        ("busy 502", 5, "the server stays busy or unavailable (HTTP 502: Bad gateway"),
        ("key refused", 6, "the server refused the API key (HTTP 401: "),
        # named by what the user passes: vision-client's --task, the scripts' PROMPT argument
        ("task refused", 7, "the server refused the {word} (HTTP 400: Invalid prompt"),
    ],
)
@pytest.mark.parametrize("tool", TOOLS[1:])
def test_a_run_that_stops_early_exits_with_the_same_status_for_each_cause(
    tool: str, cause: str, status: int, reason: str, tiny_server_url: str, tmp_path: Path
) -> None:
    """Every image would meet the same answer, so the run stops, and both clients say why with
    the same exit status (vision-client folder exited 1 for all of these) and the same words:
    "Stopped early, N image(s) not attempted: <reason>"; the images in flight that met the stop
    count as not attempted, not failed. That holds at the first request too: the bash script's
    GET /prompts to an unreachable server ended with the message alone, no summary."""
    root = tmp_path / "data"
    for seed in range(3):
        save_image(root / f"img{seed}.png", seed)
    task = "NO_SUCH_TASK" if cause == "task refused" else "CAPTION"
    busy: dict[str, Any] = (
        {"busy_first": 100, "busy_status": 502 if cause == "busy 502" else 503} if "busy" in cause else {}
    )
    with StandIn(key="the-right-key", **busy) as stand_in:
        url = {"unreachable": f"http://127.0.0.1:{free_port()}", "task refused": tiny_server_url}
        url_of_cause = url.get(cause, stand_in.url)
        command, env = client_command(
            tool, url_of_cause, root, ("--retries", "0"), ("--wait-for-server", "0"), task=task
        )
        if cause != "key refused":
            env["VISION_API_KEY"] = "the-right-key"
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    reason = reason.format(word="task" if tool == "vision-client folder" else "prompt")
    assert f"Stopped early, 3 image(s) not attempted: {reason}" in result.stderr, result.stderr[-3000:]
    assert " 0 failed" in result.stderr, result.stderr[-3000:]
    if cause == "task refused":
        assert "(HTTP 400: Invalid prompt" in result.stderr
    assert sorted(path.name for path in root.iterdir()) == ["img0.png", "img1.png", "img2.png"]


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_a_stop_at_the_first_request_counts_the_skipped_images_apart(tool: str, tmp_path: Path) -> None:
    """Nothing listens at the first request (the question about the model; --wait-for-server 0):
    the run stops with the same summary in both clients, the image whose caption exists counted
    as skipped and only the two to caption as not attempted. The bash script printed the message
    alone, and vision-client folder counted all three images as not attempted."""
    root = tmp_path / "data"
    for seed in range(3):
        save_image(root / f"img{seed}.png", seed)
    (root / "img0.txt").write_text("an old caption")
    url = f"http://127.0.0.1:{free_port()}"
    command, env = client_command(tool, url, root, folder_options=("--wait-for-server", "0"), model="m")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    stopped = "Stopped early, 2 image(s) not attempted: the server cannot be reached ("
    assert stopped in result.stderr, result.stderr[-3000:]
    assert "0 captioned, 1 skipped" in result.stderr and " 0 failed" in result.stderr, result.stderr
    assert sorted(path.name for path in root.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img2.png"]


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_the_default_retries_carry_an_image_through_four_busy_answers(tool: str, tmp_path: Path) -> None:
    """``--retries`` has one default in every folder client, 5: an overnight run rides out a
    server that answers "queue full" (503, ``Retry-After: 1``) four times in a row. The bash
    script's default was 3, so it stopped with exit 5 here (the .ps1 script's too)."""
    root = tmp_path / "data"
    save_image(root / "a.png", 0)
    with StandIn(busy_first=4) as stand_in:
        result = run_tool(tool, root, url=stand_in.url, cache=tmp_path, tmp=tmp_path)
        posts = stand_in.posts()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(posts) == 5
    assert (root / "a.txt").read_text() == "stand-in caption"


@pytest.mark.parametrize(
    ("cause", "trouble"),
    [("busy", {"prompts_status": 503}), ("a 500", {"prompts_status": 500}), ("slow", {"prompts_delay": 6.0})],
)
@pytest.mark.parametrize("tool", TOOLS[1:])
def test_trouble_at_the_first_request_is_a_warning_and_the_images_are_sent(
    tool: str, cause: str, trouble: dict, tmp_path: Path
) -> None:
    """The first request asks about the model (GET /prompts?model=: the bash script's always,
    vision-client folder's with --model). Only what every image would meet stops the run there
    (a 404, a server that cannot be reached, a refused key); a busy answer, one slower than
    --timeout (at most 30 s) or a 500 is a warning, "trying anyway", and every image is sent
    with its own --retries and --timeout. vision-client folder stopped the run (exit 5 when
    busy, 1 for a timeout or a 500), as the PowerShell script did."""
    root = tmp_path / "data"
    for seed in range(2):
        save_image(root / f"img{seed}.png", seed)
    with StandIn(**trouble) as stand_in:
        options = ("--timeout", "2", "--retries", "1")
        command, env = client_command(tool, stand_in.url, root, options, model="stand-in-model")
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
        asked = [r.path for r in stand_in.requests if r.method == "GET"]
        posts = stand_in.posts()
    assert result.returncode == 0, result.stderr[-3000:]
    assert asked[0] == "/prompts?model=stand-in-model", asked
    assert "warning: GET /prompts" in result.stderr and "trying anyway" in result.stderr, result.stderr
    assert "Stopped early" not in result.stderr and "Traceback" not in result.stderr
    assert len(posts) == 2
    assert [(root / f"img{seed}.txt").read_text() for seed in range(2)] == ["stand-in caption"] * 2


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_a_model_gone_mid_run_stops_the_run_with_exit_2_as_at_the_start(tool: str, tmp_path: Path) -> None:
    """The server restarts without the model the run names (``--model``, ``VISION_MODEL`` for the
    script): every image left would get the same 404 model_not_found, so both clients stop, as a
    404 before the first image does, with exit 2 and "check --url ... model". vision-client
    folder exited 1 once an image was captioned; the bash script failed every image in turn."""
    root = tmp_path / "data"
    for seed in range(5):
        save_image(root / f"img{seed}.png", seed)
    with StandIn(model_gone_after=2) as stand_in:
        command, env = client_command(tool, stand_in.url, root, model="gone", jobs=1)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
        posts = stand_in.posts()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(posts) == 3 and {post.get("model") for post in posts} == {"gone"}  # none after the 404
    assert sorted(path.name for path in root.glob("*.txt")) == ["img0.txt", "img1.txt"]
    stopped = (
        "Stopped early, 3 image(s) not attempted: HTTP 404: This server does not serve a model named 'gone'"
    )
    assert stopped in result.stderr, result.stderr[-3000:]
    assert "check --url" in result.stderr and " 0 failed" in result.stderr, result.stderr[-3000:]
    assert ".: check" not in result.stderr  # the server's sentence ends before the advice
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Ctrl+C before the images are listed


@pytest.mark.parametrize("tool", TOOLS[1:])
def test_ctrl_c_while_waiting_for_the_server_at_the_start_prints_the_summary(
    tool: str, tmp_path: Path
) -> None:
    """Ctrl+C while the run waits for a server that is not up yet, to ask it about the model
    (``--model``; the bash script asks first in any case), before the images are listed: exit 130
    after the same summary from both, that nothing was captioned or attempted and how to resume,
    as after a Ctrl+C later on (the bash script said only "interrupted", vision-client folder
    "0 images not captioned yet" of "0 images")."""
    root = tmp_path / "data"
    for seed in range(3):
        save_image(root / f"img{seed}.png", seed)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    command, env = client_command(tool, url, root, folder_options=("--wait-for-server", "120"), model="tiny")

    def default_sigint() -> None:  # as from a terminal, even when the test runner ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, start_new_session=True
    ) as process:
        assert process.stderr is not None
        seen = ""
        while "waiting up to 120 s" not in seen:
            line = process.stderr.readline()
            assert line, seen[-3000:]
            seen += line
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(60)
        stderr = seen + process.stderr.read()
    assert code == 130, stderr[-3000:]
    assert "0 captioned, 0 skipped, 0 failed (interrupted before the images were listed)" in stderr, stderr
    assert "nterrupted: no image attempted yet; run the same command again to resume" in stderr, stderr
    assert "Traceback" not in stderr
    assert sorted(path.name for path in root.iterdir()) == ["img0.png", "img1.png", "img2.png"]


# ---------------------------------------------------------------------------------------------
# What "model" means in JSONL rows


def test_rows_of_both_python_tools_name_the_model_by_its_served_name(cache: Path, tmp_path: Path) -> None:
    """``--model tiny=test:tiny``: ``vision-client folder`` (against a server configured so) and
    ``vision-server caption`` both write ``"model": "tiny"``; a row an older ``vision-server
    caption`` wrote with the source (``test:tiny``) still counts as done on a rerun."""
    root = tmp_path / "data"
    for seed, name in enumerate(("a.png", "b.png")):
        save_image(root / name, seed)
    (tmp_path / "server").mkdir()
    with tiny_server(
        tmp_path / "server", cache, "--model", "tiny=test:tiny", "--max-new-tokens", "8"
    ) as server:
        url = server.wait_listening(timeout=90)
        client_rows = tmp_path / "client.jsonl"
        result = run_tool(
            "vision-client folder",
            root,
            url=url,
            cache=cache,
            tmp=tmp_path,
            options=("--jsonl", str(client_rows)),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert {row["model"] for row in jsonl_rows(client_rows)} == {"tiny"}
        # --model with the source: the server answers it as "tiny", so the rerun resumes from
        # the rows "tiny" wrote (before, it looked for rows of "test:tiny" and doubled them all).
        command, env = client_command(
            "vision-client folder", url, root, folder_options=("--jsonl", str(client_rows)), model="test:tiny"
        )
        rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "0 captioned, 2 skipped" in rerun.stderr
        server.stop()
    assert len(jsonl_rows(client_rows)) == 2

    offline_rows = tmp_path / "offline.jsonl"
    old_row = {
        "source": str(root),
        "key": "a.png",
        "task": "<CAPTION>",
        "caption": "written before",
        "model": "test:tiny",
        "adapter": None,
    }
    offline_rows.write_text(json.dumps(old_row) + "\n", encoding="utf-8")
    result = run_tool(
        "vision-server caption",
        root,
        url="",
        cache=cache,
        tmp=tmp_path,
        model="tiny=test:tiny",
        options=("--jsonl", str(offline_rows)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = jsonl_rows(offline_rows)
    assert [(row["key"], row["model"]) for row in rows] == [("a.png", "test:tiny"), ("b.png", "tiny")]


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# JSONL outputs: where they go and how they spell a file name


@pytest.mark.parametrize("tool", TOOLS[:2])
def test_a_jsonl_output_in_a_missing_folder_is_refused_before_anything_is_sent(
    tool: str, cache: Path, tmp_path: Path
) -> None:
    """``--jsonl out/rows.jsonl`` where ``out`` does not exist: both Python tools stop with the
    same usage error (exit 2) and create nothing; the client asks its server nothing. It created
    the folder (a mistyped path went unnoticed)."""
    root = tmp_path / "data"
    save_image(root / "a.png", 0)
    missing = tmp_path / "out"
    with StandIn() as stand_in:
        result = run_tool(
            tool,
            root,
            url=stand_in.url,
            cache=cache,
            tmp=tmp_path,
            options=("--jsonl", str(missing / "rows.jsonl")),
        )
        asked = list(stand_in.requests)
    assert result.returncode == 2, result.stderr[-3000:]
    said = f"Error: cannot write the output: folder {missing} does not exist; create it first"
    said += f" (mkdir -p {missing})"
    assert said in result.stderr, result.stderr[-3000:]
    assert asked == [] and not missing.exists()
    assert sorted(path.name for path in root.iterdir()) == ["a.png"]


def test_both_python_tools_spell_a_file_name_that_is_not_utf8_alike_in_jsonl(
    tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """``caf<0xE9>.png`` (Latin-1 bytes): ``vision-client folder --jsonl`` and ``vision-server
    caption --jsonl`` both write ``caf\\xe9.png``, valid UTF-8 that any JSON reader takes (the
    client wrote ``\\udce9``, a lone surrogate that strict readers refuse), and each resumes from
    its rows; a client row of an earlier version (``\\udce9``) still counts as done."""
    root = tmp_path / "data"
    save_image(root / os.fsdecode(b"caf\xe9.png"), 0)
    client_rows, offline_rows, old_rows = (
        tmp_path / "client.jsonl",
        tmp_path / "offline.jsonl",
        tmp_path / "old.jsonl",
    )
    for tool, rows in (("vision-client folder", client_rows), ("vision-server caption", offline_rows)):
        for run in ("first", "rerun"):
            options = ("--jsonl", str(rows))
            result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path, options=options)
            assert result.returncode == 0, (tool, run, result.stderr[-3000:])
        assert len(jsonl_rows(rows)) == 1, (tool, rows.read_text(encoding="utf-8"))  # the rerun skipped it
        rows.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert jsonl_rows(client_rows)[0]["file"] == jsonl_rows(offline_rows)[0]["key"] == "caf\\xe9.png"
    assert "\\udc" not in client_rows.read_text(encoding="utf-8")
    old = {"file": os.fsdecode(b"caf\xe9.png"), "task": "<CAPTION>", "caption": "earlier", "model": None}
    old_rows.write_text(json.dumps(old) + "\n", encoding="utf-8")  # json.dumps writes \udce9
    assert "\\udce9" in old_rows.read_text(encoding="utf-8")
    result = run_tool(
        "vision-client folder",
        root,
        url=tiny_server_url,
        cache=cache,
        tmp=tmp_path,
        options=("--jsonl", str(old_rows)),
    )
    assert result.returncode == 0 and "0 captioned, 1 skipped" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("tool", TOOLS)
def test_caption_file_names_in_reasons_are_printable_in_every_tool(
    tool: str, tiny_server_url: str, cache: Path, tmp_path: Path
) -> None:
    """A line break in a name shows as ``\\n`` in each reason that names the caption file (and
    the other image sharing it), as it does in the image's own name: before, the reasons held the
    raw names, so one failure printed as two lines and the second could pass for a report."""
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("a\nb.jpg", "a\nb.png", "c\nd.png", "e.png")):
        save_image(root / name, seed)
    (root / "c\nd.txt").mkdir()
    result = run_tool(tool, root, url=tiny_server_url, cache=cache, tmp=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    pair = "neither is captioned, rename one of them"
    lines = result.stderr.splitlines()
    for expected in (
        f"a\\nb.jpg: shares its caption file a\\nb.txt with a\\nb.png; {pair}",
        f"a\\nb.png: shares its caption file a\\nb.txt with a\\nb.jpg; {pair}",
        "c\\nd.png: c\\nd.txt is a directory, not a caption file",
    ):
        assert any(line.endswith(expected) for line in lines), (expected, result.stderr[-3000:])
    assert not any(line.startswith(("b.txt", "d.txt", "b.png;", "b.jpg;")) for line in lines), result.stderr
    assert (root / "e.txt").read_text(encoding="utf-8").strip()
