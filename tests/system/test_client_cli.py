"""``vision-client`` as a real subprocess: output streams, exit codes, options and env vars.

Most tests talk to the real ``vision-server`` (tiny test model) started once for the module; the
API-key test uses an in-process stand-in so the key check does not depend on server options.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.images import save_flat
from tests.support.leftovers import OLD, YOUNG, caption_temp
from tests.support.processes import ServerProcess, free_port, run_across_a_restart
from tests.support.raw_http import caption_answer, http_answer, image_name, raw_server
from tests.support.stand_in import PROMPTS, StandIn

CLI = (
    shutil.which("vision-client", path=str(Path(sys.executable).parent))
    or shutil.which("vision-client")
    or ""
)

pytestmark = pytest.mark.skipif(not CLI, reason="the vision-client console script is not installed")


def client_env(env: dict[str, str] | None = None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("VISION_HOST", "VISION_API_KEY")}
    full_env.update(env or {})
    return full_env


def run(
    *args: str, url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    command = [CLI, *(["--url", url] if url else []), *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=client_env(env),
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


@pytest.fixture
def images(tmp_path: Path) -> Path:
    save_flat(tmp_path / "red one.png", (220, 20, 20), (32, 32))
    save_flat(tmp_path / "sub" / "grün.jpg", (20, 220, 20), (32, 32))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a complete image")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Help and usage errors (no server needed)


def test_help_documents_every_option() -> None:
    top = run("--help")
    assert top.returncode == 0
    for word in (
        "--url",
        "VISION_HOST",
        "--api-key",
        "VISION_API_KEY",
        "--timeout",
        "--retries",
        "caption",
        "folder",
        "prompts",
        "model",
        "status",
    ):
        assert word in top.stdout
    folder = run("folder", "--help")
    for option in (
        "--task",
        "--ext",
        "--mode",
        "skip|overwrite|append|prepend",
        "--prefix",
        "--suffix",
        "--separator",
        "--concurrency",
        "--no-recursive",
        "--jsonl",
        "--wait-for-server",
        "--limit",
        "--dry-run",
    ):
        assert option in folder.stdout
    assert "only lines of that model" in " ".join(folder.stdout.split())
    assert "--task" in run("caption", "--help").stdout


def test_bad_options_exit_2(tmp_path: Path) -> None:
    assert run("folder", str(tmp_path), "--mode", "replace").returncode == 2
    refused = run("folder", str(tmp_path), "--ext", "png")
    assert refused.returncode == 2
    assert "image extension" in refused.stderr
    assert run("caption").returncode == 2  # at least one image is required


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["folder", "DIR", "--model", "blip"], "--model"),
        (["folder", "DIR", "--retries=3"], "--retries"),
        (["caption", "-m", "blip", "x.png"], "-m"),
        (["status", "--url", "http://127.0.0.1:9"], "--url"),
        (["prompts", "--version"], "--version"),
    ],
)
def test_an_option_of_vision_client_itself_after_the_command_says_where_it_goes(
    tmp_path: Path, args: list[str], name: str
) -> None:
    """The docs' shared folder options (``--retries``, ``--timeout``) and ``--model`` are the
    group's: after the subcommand click alone says only "No such option"."""
    result = run(*(str(tmp_path) if arg == "DIR" else arg for arg in args))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert f"Error: {name} is an option of vision-client itself, not of {args[0]}" in message, message
    written = name if name == "--version" else f"{name} ..."
    assert f"give it before the command (vision-client {written} {args[0]} ...)" in message, message


def test_an_unknown_option_is_still_click_s_own_message(tmp_path: Path) -> None:
    result = run("folder", str(tmp_path), "--nope")
    assert result.returncode == 2 and "No such option '--nope'" in result.stderr, result.stderr


def test_unreachable_server_exits_1_with_a_clean_message(tmp_path: Path) -> None:
    image = save_flat(tmp_path / "a.png", (1, 2, 3), (32, 32))
    url = f"http://127.0.0.1:{free_port()}"
    result = run("--retries", "0", "caption", str(image), url=url)
    assert result.returncode == 1
    assert result.stdout == ""  # nothing that could end up in a caption file
    assert "cannot reach" in result.stderr
    assert "connection refused (is vision-server running there?" in result.stderr
    assert "Traceback" not in result.stderr and "ssl:default" not in result.stderr
    listed = run("--retries", "2", "prompts", env={"VISION_HOST": url, "VISION_API_KEY": "x"}, timeout=30)
    assert listed.returncode == 1  # retried, then gave up
    assert url in listed.stderr


def test_folder_waits_for_a_server_not_up_yet_then_stops_after_the_window(tmp_path: Path) -> None:
    """A server not started yet is waited for (--wait-for-server), as the folder scripts do; the
    line names the URL, so a typo shows at once; after the window the run stops early."""
    for name in ("a.png", "b.png"):
        save_flat(tmp_path / name, (1, 2, 3), (32, 32))
    url = f"http://127.0.0.1:{free_port()}"
    result = run("--retries", "0", "folder", str(tmp_path), "--wait-for-server", "1", url=url, timeout=30)
    assert result.returncode == 3  # as the folder scripts (it was 1)
    assert f"server unreachable at {url} (not up yet?); waiting up to 1 s" in result.stderr
    assert "Stopped early, 2 image(s) not attempted: the server cannot be reached (" in result.stderr
    assert "cannot reach" in result.stderr
    assert list(tmp_path.glob("*.txt")) == []


def test_folder_with_a_host_name_that_does_not_resolve_stops_at_once(tmp_path: Path) -> None:
    save_flat(tmp_path / "a.png", (1, 2, 3), (32, 32))
    result = run("folder", str(tmp_path), url="http://no-such-host.invalid:54880", timeout=30)
    assert result.returncode == 3
    assert "the host name 'no-such-host.invalid' does not resolve" in result.stderr
    assert "waiting up to" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Against the real server


def test_info_commands(server: str) -> None:
    prompts = run("prompts", env={"VISION_HOST": server})
    assert prompts.returncode == 0, prompts.stderr
    assert prompts.stdout.splitlines() == PROMPTS
    model = run("model", url=server)
    assert (model.returncode, model.stdout.strip()) == (0, "test:tiny")
    status = run("status", url=server.removeprefix("http://"))  # host:port works too
    assert status.returncode == 0
    assert isinstance(json.loads(status.stdout), dict)


def test_caption_one_and_many(server: str, images: Path) -> None:
    red = images / "red one.png"
    one = run("caption", str(red), "--task", "caption", url=server)
    assert one.returncode == 0, one.stderr
    text = one.stdout.strip()
    assert text and "\n" not in text and not text.startswith(str(red))

    many = run("caption", str(red), str(images / "sub" / "grün.jpg"), "-t", "<CAPTION>", url=server)
    assert many.returncode == 0, many.stderr
    lines = many.stdout.splitlines()
    assert lines[0] == f"{red}: {text}"  # same image, same task, same caption
    assert lines[1].startswith(f"{images / 'sub' / 'grün.jpg'}: ")


def test_caption_reports_bad_images_and_keeps_going(server: str, images: Path) -> None:
    result = run(
        "caption",
        str(images / "broken.png"),
        str(images / "red one.png"),
        str(images / "gone.png"),
        url=server,
    )
    assert result.returncode == 1
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(images / "red one.png")]
    assert "broken.png: error: HTTP 400: Invalid image data" in result.stderr
    assert "gone.png: error:" in result.stderr


def test_folder_run_summary_exit_code_and_resume(server: str, images: Path) -> None:
    crashed = caption_temp(images / "sub", "0123456789abcdef", OLD)  # what a kill -9 left
    writing = caption_temp(images, "fedcba9876543210", YOUNG)  # maybe another run's write now
    first = run("folder", str(images), "--task", "caption", "--prefix", "ohwx, ", url=server)
    assert first.returncode == 1  # broken.png failed
    assert "2 captioned, 0 skipped, 1 failed of 3 images" in first.stderr
    assert "removed 1 leftover temporary caption file(s)" in first.stderr
    assert not crashed.exists() and writing.exists()
    assert "broken.png" in first.stderr and "Invalid image data" in first.stderr
    assert first.stdout == ""
    assert (images / "red one.txt").read_text(encoding="utf-8").startswith("ohwx, ")
    assert (images / "sub" / "grün.txt").read_text(encoding="utf-8").startswith("ohwx, ")
    assert not (images / "broken.txt").exists()

    (images / "broken.png").unlink()
    second = run("folder", str(images), "--task", "caption", url=server)
    assert second.returncode == 0, second.stderr
    assert "0 captioned, 2 skipped, 0 failed of 2 images" in second.stderr

    flat = run(
        "folder",
        str(images),
        "--no-recursive",
        "--mode",
        "append",
        "--separator",
        " // ",
        "-j",
        "2",
        url=server,
    )
    assert flat.returncode == 0, flat.stderr
    assert "1 captioned" in flat.stderr
    assert " // " in (images / "red one.txt").read_text(encoding="utf-8")


def test_folder_dry_run_lists_what_a_run_would_do_and_sends_nothing(images: Path) -> None:
    """As vision-server caption --dry-run: no server is needed (the URL has none), nothing is written."""
    save_flat(images / "sub" / "grün.png", (1, 2, 3), (32, 32))  # shares grün.txt with grün.jpg
    save_flat(images / "done.png", (4, 5, 6), (32, 32))
    (images / "done.txt").write_text("kept\n", encoding="utf-8")
    before = sorted(p.name for p in images.rglob("*"))
    url = f"http://127.0.0.1:{free_port()}"
    result = run("folder", str(images), "--task", "caption", "--dry-run", url=url)
    assert result.returncode == 1, result.stderr  # the two images sharing a caption file would fail
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    clash = "neither is captioned, rename one of them"
    assert [(word, Path(path).name) for word, path, _ in lines] == [
        ("caption", "broken.png"), ("skip", "done.png"), ("caption", "red one.png"),
        ("fail", "grün.jpg"), ("fail", "grün.png"),
    ]  # fmt: skip
    assert lines[0][2] == "<CAPTION>" and lines[1][2] == "already captioned" and clash in lines[3][2]
    assert "dry run: 2 to caption, 1 skipped, 2 failing" in result.stderr
    assert sorted(p.name for p in images.rglob("*")) == before
    limited = run("folder", str(images), "--dry-run", "--limit", "1", url=url)
    assert [line.split("\t")[0] for line in limited.stdout.splitlines()].count("caption") == 1
    assert "1 to caption, 1 skipped, 2 failing, 1 left for later runs (--limit)" in limited.stderr


def test_folder_reports_every_image_named_entry_and_escapes_odd_names(tmp_path: Path) -> None:
    """As vision-server caption: a broken symlink, a symlink loop and a FIFO named like images
    are failures with their reason (they were left out without a word, so the count of images
    was short), and a line break or tab in a name is escaped, so each dry-run line is three
    tab-separated fields and each failure one line."""
    root = tmp_path / "scraped"
    save_flat(root / "fine.png", (1, 2, 3), (32, 32))
    save_flat(root / "new\nline.png", (4, 5, 6), (32, 32))
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(root / "pipe.png")
    url = f"http://127.0.0.1:{free_port()}"  # a dry run asks no server
    result = run("folder", str(root), "--dry-run", url=url)
    assert result.returncode == 1, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert all(len(line) == 3 for line in lines), result.stdout
    assert [(word, Path(path).name, detail) for word, path, detail in lines] == [
        ("caption", "fine.png", "<MORE_DETAILED_CAPTION>"),
        ("fail", "gone.jpg", "broken symlink (points to nowhere.jpg)"),
        ("fail", "loop.jpg", "symlink loop"),
        ("caption", "new\\nline.png", "<MORE_DETAILED_CAPTION>"),
        ("fail", "pipe.png", "not a regular file"),
    ]
    assert "dry run: 2 to caption, 0 skipped, 3 failing" in result.stderr
    if os.geteuid() != 0:  # root lists a mode-000 folder anyway
        locked = root / "locked"
        save_flat(locked / "inside.png", (7, 8, 9), (32, 32))
        locked.chmod(0)
        try:
            again = run("folder", str(root), "--dry-run", url=url)
        finally:
            locked.chmod(0o755)
        assert f"fail\t{locked}\tcannot list folder: permission denied" in again.stdout.splitlines()


def test_folder_limit_captions_n_and_the_next_run_the_next(server: str, images: Path) -> None:
    (images / "broken.png").unlink()
    first = run("folder", str(images), "--task", "caption", "--limit", "1", url=server)
    assert first.returncode == 0, first.stderr
    assert "1 captioned, 0 skipped, 0 failed of 2 images" in first.stderr
    assert "1 more image left for a later run (--limit)" in first.stderr
    assert len(list(images.rglob("*.txt"))) == 1
    second = run("folder", str(images), "--task", "caption", "--limit", "1", url=server)
    assert "1 captioned, 1 skipped, 0 failed of 2 images" in second.stderr
    assert "left for a later run" not in second.stderr and len(list(images.rglob("*.txt"))) == 2


def test_folder_jsonl(server: str, images: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    (images / "broken.png").unlink()
    crashed = caption_temp(images, "0123456789abcdef", OLD)
    out = tmp_path_factory.mktemp("out") / "tags.jsonl"
    first = run("folder", str(images), "--task", "GENERATE_TAGS", "--jsonl", str(out), url=server)
    assert first.returncode == 0, first.stderr
    assert crashed.exists() and "leftover" not in first.stderr  # a JSONL run writes nothing there
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["file"] for r in records) == ["red one.png", "sub/grün.jpg"]
    assert {r["task"] for r in records} == {"<GENERATE_TAGS>"}
    assert {r["model"] for r in records} == {"test:tiny"}  # the served model that answered
    assert list(images.rglob("*.txt")) == []
    second = run("folder", str(images), "--task", "generate_tags", "--jsonl", str(out), url=server)
    assert "0 captioned, 2 skipped" in second.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_folder_run_outlives_a_server_restart(tmp_path: Path) -> None:
    """SIGKILL the server mid-run and start it again on the same port a few seconds later.

    The run pauses (far longer than ``--retries 1`` would wait), resends the images that were in
    flight, and ends with every image captioned and exit 0, as an overnight run must.
    """
    port = free_port()
    data = tmp_path / "data"
    for i in range(16):
        save_flat(data / f"{i:02}.png", (12 * i, 90, 250 - 9 * i), (32, 32))

    def command(url: str) -> list[str]:
        return [CLI, "--url", url, "--retries", "1", "folder", str(data), "-j", "4", "-t", "caption"]

    # Down for a while: --retries 1 alone gives up after about half a second.
    returncode, err = run_across_a_restart(
        tmp_path,
        command,
        client_env(),
        lambda: bool(list(data.glob("*.txt"))),
        delay=0.4,
        down=3,
        port=port,
        max_batch_size=2,
    )
    assert returncode == 0, err
    assert "server unreachable; waiting up to 300 s for it to come back" in err
    assert "server back; going on" in err
    assert "16 captioned, 0 skipped, 0 failed of 16 images" in err
    assert all(image.with_suffix(".txt").read_text(encoding="utf-8") for image in data.glob("*.png"))


def test_folder_jsonl_run_outlives_a_server_restart_with_each_image_once(tmp_path: Path) -> None:
    """The same restart with ``--jsonl`` output: the images whose requests the kill broke are sent
    again, and the file ends with one whole row per image (none lost, none twice)."""
    port = free_port()
    data, out = tmp_path / "data", tmp_path / "out.jsonl"
    for i in range(16):
        save_flat(data / f"{i:02}.png", (12 * i, 90, 250 - 9 * i), (32, 32))

    def command(url: str) -> list[str]:
        return [CLI, "--url", url, "folder", str(data), "-j", "4", "-t", "caption", "--jsonl", str(out)]

    returncode, err = run_across_a_restart(
        tmp_path,
        command,
        client_env(),
        lambda: out.exists() and bool(out.read_text()),
        delay=0.4,
        down=2,
        port=port,
        max_batch_size=2,
    )
    assert returncode == 0, err
    assert "server back; going on" in err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(row["file"] for row in rows) == sorted(image.name for image in data.glob("*.png"))


def test_folder_jsonl_run_killed_then_rerun_takes_over_its_lock_and_mends_a_torn_line(tmp_path: Path) -> None:
    """kill -9 of ``vision-client folder --jsonl`` mid-run: the lock it held dies with it (the
    rerun is not refused as "another run"), and a last line the kill tore in the middle of a
    write (made by hand here: a kill lands there rarely) is ended, skipped and not counted, so
    the rerun writes each image left once and the file ends with one whole row per image."""
    data, out = tmp_path / "data", tmp_path / "out.jsonl"
    for i in range(12):
        save_flat(data / f"{i:02}.png", (20 * i, 90, 250 - 9 * i), (32, 32))
    with ServerProcess.fake(tmp_path, "server", delay=0.3, max_batch_size=2) as server:
        url = server.wait_listening()
        command = [CLI, "--url", url, "folder", str(data), "-j", "2", "-t", "caption", "--jsonl", str(out)]
        client = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=client_env())
        try:
            end = time.monotonic() + 60
            while (out.read_text().count("\n") if out.exists() else 0) < 2:
                assert client.poll() is None and time.monotonic() < end
                time.sleep(0.02)
            client.kill()
        finally:
            client.communicate(timeout=30)
        assert (tmp_path / ".out.jsonl.lock").exists()  # left behind, but no longer held
        with out.open("a", encoding="utf-8") as torn:
            torn.write('{"file": "11.png", "task": "<CAPTION>", "capt')
        rerun = subprocess.run(command, capture_output=True, text=True, env=client_env(), timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    assert len(rows) == len(lines) - 1  # the torn line alone does not parse
    assert sorted(row["file"] for row in rows) == sorted(image.name for image in data.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# API key (stand-in server)


async def test_api_key_from_option_or_env(aiohttp_server, tmp_path: Path) -> None:
    async def model(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer right-key":
            return web.json_response(
                {"detail": "Missing or invalid API key"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return web.json_response("stub-model")

    app = web.Application()
    app.router.add_get("/model", model)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")

    async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        # Run the blocking subprocess in a thread so this loop keeps serving the stand-in.
        return await asyncio.to_thread(run, *args, url=url, env=env)

    missing = await cli("model")
    assert missing.returncode == 1
    assert "HTTP 401: Missing or invalid API key" in missing.stderr
    assert "vision-client: --api-key or VISION_API_KEY" in missing.stderr  # where the key goes
    gone = await cli("--api-key", "right-key", "caption", str(tmp_path / "gone.jpg"))
    assert gone.returncode == 1
    assert gone.stderr.strip() == f"{tmp_path / 'gone.jpg'}: error: No such file or directory", gone.stderr
    assert (await cli("--api-key", "right-key", "model")).stdout.strip() == "stub-model"
    assert (await cli("model", env={"VISION_API_KEY": "right-key"})).stdout.strip() == "stub-model"


async def test_folder_with_a_whitespace_only_caption_exits_1(aiohttp_server, tmp_path: Path) -> None:
    """``{"result": "   "}`` is a failed image: no 0-byte caption file, exit status 1."""

    async def blank(_request: web.Request) -> web.Response:
        return web.json_response({"result": "   "})

    app = web.Application()
    app.router.add_post("/process_image", blank)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    save_flat(tmp_path / "a.png", (1, 2, 3), (32, 32))
    result = await asyncio.to_thread(run, "folder", str(tmp_path), url=url)
    assert result.returncode == 1, result.stderr
    assert "empty caption" in result.stderr
    assert not (tmp_path / "a.txt").exists()


async def test_caption_stopped_by_an_unexpected_failure_ends_its_own_requests(
    aiohttp_server, tmp_path: Path
) -> None:
    """An answer no code foresaw (a redirect to an ftp:// URL, which aiohttp refuses with an
    error of its own) stops ``caption`` with one error line and exit 1: the requests still in
    flight are cancelled and awaited, and a failure already in hand is taken, so asyncio prints
    no "Task exception was never retrieved" and Python no traceback."""
    refused_answered = asyncio.Event()

    async def process_image(request: web.Request) -> web.StreamResponse:
        name = base64.b64decode((await request.json())["image"]).decode()
        if name == "refused":  # fails, as expected, while "bad" is awaited: its error not printed yet
            refused_answered.set()
            return web.json_response({"detail": "Invalid image data"}, status=400)
        if name == "bad":
            await refused_answered.wait()
            await asyncio.sleep(0.2)  # the client reads the 400 first (else it only proves less)
            raise web.HTTPFound(UNFOLLOWABLE)
        if name == "slow":  # in flight when the run stops
            await asyncio.Event().wait()
        return web.json_response({"result": f"caption of {name}"})

    app = web.Application()
    app.router.add_post("/process_image", process_image)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    names = ("ok", "bad", "refused", "slow")
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    files = [str(tmp_path / f"{name}.png") for name in names]
    result = await asyncio.to_thread(run, "caption", *files, url=url)
    assert result.returncode == 1
    assert result.stdout == f"{files[0]}: caption of ok\n"  # whole lines, none after the failure
    assert result.stderr.splitlines() == [
        f"error: {files[1]}: unexpected failure (NonHttpUrlRedirectClientError: {UNFOLLOWABLE}); "
        "stopped, the images after it not printed"
    ], result.stderr


# A redirect aiohttp will not follow, with an error no code of the client expects: the tests'
# stand-in for a failure nothing foresaw (a bug), since every answer the client knows of fails
# only its image.
UNFOLLOWABLE = "ftp://example.invalid/caption"
# JSON nested deeper than Python decodes (RecursionError, not ValueError).
TOO_DEEP = "[" * 100_000 + "]" * 100_000


async def test_caption_a_reply_that_is_not_http_fails_that_image_in_one_line(tmp_path: Path) -> None:
    """A broken proxy's status line (``HTTP/1.1 abc``), or a body its Content-Encoding does not
    decode, is that image's failure, on one line that names the URL and what was wrong
    (aiohttp's messages span lines, with a caret line). Neither is sent again: something
    answered, and would answer alike (as a 4xx). The first was a traceback; the second was
    retried as a lost connection, then said 'cannot reach URL: 400, message: ...'."""
    sent: list[str] = []

    async def reply(_path: str, body: bytes) -> bytes:
        name = image_name(body)
        sent.append(name)
        if name == "broken":
            return b"HTTP/1.1 abc Broken\r\nContent-Length: 2\r\n\r\n{}"
        if name == "not-gzip":
            return b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nabcde"
        return caption_answer(f"caption of {name}")

    names = ("ok", "broken", "not-gzip", "after")
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    files = [str(tmp_path / f"{name}.png") for name in names]
    async with raw_server(reply) as url:
        result = await asyncio.to_thread(run, "caption", *files, url=url)
    assert result.returncode == 1
    assert result.stdout == f"{files[0]}: caption of ok\n{files[3]}: caption of after\n"
    assert result.stderr.splitlines() == [
        f"{files[1]}: error: {url}/process_image answered with something that is not valid HTTP "
        "(Bad status line: Invalid status code: b'HTTP/1.1 abc Broken')",
        f"{files[2]}: error: {url}/process_image answered with something that is not valid HTTP "
        "(Can not decode content-encoding: gzip)",
    ], result.stderr
    assert sorted(sent) == sorted(names)  # each broken one once: no retry


async def test_caption_a_redirect_loop_fails_that_image_in_one_line(aiohttp_server, tmp_path: Path) -> None:
    """A proxy that redirects for ever is that image's failure, saying so (aiohttp's
    TooManyRedirects is a ClientResponseError with no message: not shown as invalid HTTP). It
    stopped the run as "unexpected failure (TooManyRedirects: 0, message='', url=...)"."""

    async def loop(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/process_image")

    app = web.Application()
    app.router.add_route("*", "/process_image", loop)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    image = tmp_path / "a.png"
    image.write_bytes(b"a")
    result = await asyncio.to_thread(run, "caption", str(image), url=url)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{image}: error: {url}/process_image kept redirecting (10 redirects); check --url (or the proxy)"
    ], result.stderr


async def test_caption_json_nested_too_deep_fails_that_image(aiohttp_server, tmp_path: Path) -> None:
    """JSON nested too deep to decode (RecursionError, not ValueError) is that image's failure,
    as any body that is not JSON; in an error answer the body is read as text. Both escaped as
    a RecursionError traceback (since 79d9007: stopped the run as an unexpected failure)."""

    async def process_image(request: web.Request) -> web.Response:
        name = base64.b64decode((await request.json())["image"]).decode()
        if name in ("deep", "deep-400"):
            status = 400 if name == "deep-400" else 200
            return web.Response(text=TOO_DEEP, status=status, content_type="application/json")
        return web.json_response({"result": f"caption of {name}"})

    app = web.Application()
    app.router.add_post("/process_image", process_image)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    names = ("deep", "deep-400", "ok")
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    files = [str(tmp_path / f"{name}.png") for name in names]
    result = await asyncio.to_thread(run, "caption", *files, url=url)
    assert result.returncode == 1
    assert result.stdout == f"{files[2]}: caption of ok\n"
    assert result.stderr.splitlines() == [
        f"{files[0]}: error: {url}/process_image answered with JSON nested too deep to read",
        f"{files[1]}: error: HTTP 400: {TOO_DEEP[:500]}",
    ], result.stderr


async def test_folder_a_malformed_reply_fails_that_image_and_the_run_goes_on(tmp_path: Path) -> None:
    """In a folder run a reply that is not valid HTTP, or JSON too deep to read, fails that image
    alone: counted and named in the summary, the other images captioned, exit status 1. The
    first escaped from the run as aiohttp's exception, the second as a RecursionError."""

    async def reply(_path: str, body: bytes) -> bytes:
        name = image_name(body)
        if name == "broken":
            return b"HTTP/1.1 abc Broken\r\nContent-Length: 2\r\n\r\n{}"
        if name == "deep":
            return http_answer(200, TOO_DEEP)
        return caption_answer(f"caption of {name}")

    for name in ("a", "broken", "deep", "z"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    async with raw_server(reply) as url:
        result = await asyncio.to_thread(run, "folder", str(tmp_path), "-j", "2", url=url)
    assert result.returncode == 1, result.stderr
    assert "2 captioned, 0 skipped, 2 failed of 4 images" in result.stderr
    lines = result.stderr.splitlines()
    assert (
        f"  {tmp_path / 'broken.png'}: {url}/process_image answered with something that is not valid "
        "HTTP (Bad status line: Invalid status code: b'HTTP/1.1 abc Broken')"
    ) in lines, result.stderr
    deep = f"  {tmp_path / 'deep.png'}: {url}/process_image answered with JSON nested too deep to read"
    assert deep in lines, result.stderr
    assert "Stopped early" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.glob("*.txt")) == ["a.txt", "z.txt"]
    assert (tmp_path / "z.txt").read_text(encoding="utf-8") == "caption of z"


@pytest.mark.parametrize("output", ["txt", "jsonl"])
async def test_folder_stopped_by_an_unexpected_failure_ends_its_requests_and_a_rerun_resumes(
    aiohttp_server, tmp_path: Path, output: str
) -> None:
    """A failure nothing foresaw in one worker stops ``folder``: the other workers' requests are
    cancelled and awaited (not left to asyncio.run), the outputs hold whole captions only, the
    summary ends in one line naming the image and the exception, exit status 1; the same command
    then captions just the images left. It ended in a Python traceback."""
    answered: set[str] = set()
    both_answered = asyncio.Event()
    sent: list[str] = []
    rerun = False

    async def process_image(request: web.Request) -> web.StreamResponse:
        name = base64.b64decode((await request.json())["image"]).decode()
        sent.append(name)
        if not rerun and name == "c":  # the failure, once a and b are stored
            await both_answered.wait()
            await asyncio.sleep(0.2)
            raise web.HTTPFound(UNFOLLOWABLE)
        if not rerun and name in ("d", "e", "f"):  # in flight (or not started) when the run stops
            await asyncio.Event().wait()
        answered.add(name)
        if {"a", "b"} <= answered:
            both_answered.set()
        return web.json_response({"result": f"caption of {name}"})

    app = web.Application()
    app.router.add_post("/process_image", process_image)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    data = tmp_path / "data"
    data.mkdir()
    names = ("a", "b", "c", "d", "e", "f")
    for name in names:
        (data / f"{name}.png").write_bytes(name.encode())
    jsonl = tmp_path / "captions.jsonl"
    command = ("folder", str(data), "-j", "4", *(("--jsonl", str(jsonl)) if output == "jsonl" else ()))

    def stored() -> dict[str, str]:
        if output == "txt":
            return {path.stem: path.read_text(encoding="utf-8") for path in data.glob("*.txt")}
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]  # each whole
        return {Path(row["file"]).stem: row["caption"] for row in rows}

    result = await asyncio.to_thread(run, *command, url=url)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Stopped early, 4 image(s) not attempted: unexpected failure at {data / 'c.png'} "
        f"(NonHttpUrlRedirectClientError: {UNFOLLOWABLE}); the requests in flight were dropped, "
        "nothing is half-written: run the same command again to resume"
    ), result.stderr
    assert "2 captioned, 0 skipped, 0 failed of 6 images" in result.stderr
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, result.stderr
    assert stored() == {"a": "caption of a", "b": "caption of b"}
    assert list(data.glob(".vision-caption.*")) == []  # no temporary caption file left

    rerun = True
    sent.clear()
    again = await asyncio.to_thread(run, *command, url=url)
    assert again.returncode == 0, again.stderr
    assert "4 captioned, 2 skipped, 0 failed of 6 images" in again.stderr
    assert sorted(sent) == ["c", "d", "e", "f"]
    assert stored() == {name: f"caption of {name}" for name in names}


# ---------------------------------------------------------------------------------------------
# Behind a proxy (stand-in playing HAProxy with every server down for a while)


def test_folder_run_waits_while_a_proxy_has_no_server(tmp_path: Path) -> None:
    """HAProxy answers 502/503 itself (no Retry-After, an HTML page) while every server behind it
    restarts: once --retries are used up the run pauses like for a refused connection, probes
    /health (a 503 there too means "not yet") and sends the images again; nothing fails."""
    images = [save_flat(tmp_path / f"img{i}.png", (i, 2, 3), (16, 16)) for i in range(8)]
    with StandIn(outage_after=2, outage_seconds=3) as proxy:
        result = run("--retries", "1", "folder", str(tmp_path), "-j", "2", url=proxy.url, timeout=90)
        health = [r for r in proxy.requests if r.path == "/health"]
    assert result.returncode == 0, result.stderr
    assert proxy.outage_answers >= 3 and len(health) >= 2, result.stderr
    assert "no server behind the proxy answers (HTTP 50" in result.stderr
    assert (
        "waiting up to 300 s for it to come back" in result.stderr
        and "server back; going on" in result.stderr
    )
    assert "8 captioned, 0 skipped, 0 failed of 8 images" in result.stderr
    assert all(
        image.with_suffix(".txt").read_text(encoding="utf-8") == "stand-in caption" for image in images
    )


def test_folder_run_waits_for_a_pool_that_is_down_at_the_start(tmp_path: Path) -> None:
    """A proxy whose servers are all restarting when the run starts (HAProxy's own 503s): the run
    waits for one to come up, as for a server that went away mid-run, and captions everything."""
    images = [save_flat(tmp_path / f"img{i}.png", (i, 2, 3), (16, 16)) for i in range(3)]
    with StandIn(outage_after=0, outage_seconds=2) as proxy:
        result = run("--retries", "0", "folder", str(tmp_path), "-j", "1", url=proxy.url, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no server behind the proxy answers (HTTP 50" in result.stderr
    assert f"at {proxy.url} (not up yet?); waiting up to 300 s" in result.stderr
    assert "server back; going on" in result.stderr
    assert all(
        image.with_suffix(".txt").read_text(encoding="utf-8") == "stand-in caption" for image in images
    )


def test_folder_stops_at_once_on_a_404(tmp_path: Path, server: str) -> None:
    """A --url with a path (or, on a server of several models, a --model it does not serve):
    every image would fail alike, so the run stops instead of failing each one, with exit 2 (a
    mistake to fix before anything runs, as the folder scripts say)."""
    for name in ("a.png", "b.png", "c.png"):
        save_flat(tmp_path / name, (1, 2, 3), (16, 16))
    result = run("folder", str(tmp_path), "-j", "1", url=server + "/api", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Stopped early, 3 image(s) not attempted" in result.stderr  # the first one met the stop
    assert "HTTP 404: " in result.stderr
    # No --model was given, so only the address can be wrong (with one, the advice names it too).
    assert ": check --url (the server's base address)\n" in result.stderr
    assert list(tmp_path.glob("*.txt")) == []


def test_servers_own_503_keeps_its_retries_rule(tmp_path: Path) -> None:
    """A vision server's 503 (queue full: Retry-After and JSON) is busy, not gone: no wait."""
    image = save_flat(tmp_path / "a.png", (1, 2, 3), (16, 16))
    with StandIn(busy_first=2) as busy:
        result = run("--retries", "1", "folder", str(tmp_path), url=busy.url, timeout=60)
    assert result.returncode == 5  # busy after --retries: the run stops, as the folder scripts' (it was 1)
    assert "HTTP 503: Queue full" in result.stderr and "waiting up to" not in result.stderr
    assert not image.with_suffix(".txt").exists()
