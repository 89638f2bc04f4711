"""The bash clients (clients/*.sh) as real subprocesses against a real ``vision-server``.

One server (the shared ``tiny_server_url``, see conftest) serves the module. A few tests use the
stand-in of ``tests.support.stand_in`` instead, for what the real server does not do on demand:
hang (timeouts, Ctrl+C) and answer 503 (retries).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from tests.support import hidden_names, paths
from tests.support.images import save as save_image
from tests.support.leftovers import OLD, YOUNG, aged, caption_temp
from tests.support.processes import ServerProcess, free_port, http_json, run_across_a_restart
from tests.support.stand_in import StandIn, interrupt_in_flight
from tests.support.tls import self_signed
from vision_server.captionfiles import printable

REPO = paths.REPO
CLIENT = REPO / "clients" / "vision-client.sh"
FOLDER = REPO / "clients" / "vision-caption-folder-images.sh"
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("bash", "curl", "base64")),
    reason="the shell clients need bash, curl and base64",
)


# ---------------------------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> Path:
    """A private TMPDIR for the scripts, to check that they leave nothing behind."""
    path = tmp_path / "script-tmp"
    path.mkdir()
    return path


def base_env(tmp: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    env.update(extra)
    return env


def run(
    script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env or base_env(), timeout=timeout, cwd=cwd
    )


_CAPTIONS: dict[tuple[str, bytes, str], str] = {}


def caption_direct(server: str, image: Path, prompt: str = "<CAPTION>") -> str:
    """The server's caption for IMAGE from a plain HTTP request (cached by content)."""
    data = image.read_bytes()
    key = (server, hashlib.sha256(data).digest(), prompt)
    if key not in _CAPTIONS:
        status, body = http_json(
            server + "/process_image", {"image": base64.b64encode(data).decode(), "prompt": prompt}
        )
        assert status == 200, body
        assert isinstance(body, dict)
        _CAPTIONS[key] = body["result"].strip()
    return _CAPTIONS[key]


def captions_direct(server: str, images: list[Path], prompt: str = "<CAPTION>") -> dict[Path, str]:
    """caption_direct for many images at once (concurrent requests, so the server batches)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = list(pool.map(lambda image: caption_direct(server, image, prompt), images))
    return dict(zip(images, texts, strict=True))


def as_file_caption(text: str) -> str:
    """What the folder script writes for a caption: line breaks become spaces."""
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def path_without(tmp: Path, *hidden: str) -> str:
    """A PATH offering everything the current one does except the named programs ("python*": a prefix)."""

    def is_hidden(name: str) -> bool:
        return any(name.startswith(h[:-1]) if h.endswith("*") else name == h for h in hidden)

    farm = tmp / ("path-without-" + "-".join(h.rstrip("*") for h in hidden))
    farm.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = farm / entry.name
            if not is_hidden(entry.name) and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    for name in ("jq", "python", "python3"):
        if is_hidden(name):
            assert shutil.which(name, path=str(farm)) is None
    return str(farm)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".vision-caption") or p.suffix == ".tmp"]


# ---------------------------------------------------------------------------------------------
# vision-client.sh


def test_scripts_are_executable() -> None:
    for script in (CLIENT, FOLDER):
        assert os.access(script, os.X_OK), script
        assert script.read_text().startswith("#!/usr/bin/env bash\n")


def test_help() -> None:
    result = run(CLIENT, "--help")
    assert result.returncode == 0
    for word in ("--url", "--timeout", "VISION_HOST", "VISION_API_KEY", "prompts", "model", "status"):
        assert word in result.stdout
    result = run(FOLDER, "--help")
    assert result.returncode == 0
    for word in (
        "--mode",
        "overwrite",
        "append",
        "prepend",
        "--prefix",
        "--suffix",
        "--jobs",
        "--no-recursive",
    ):
        assert word in result.stdout


def test_caption_matches_the_server(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    image = save_image(tmp_path / "photo.png", 3)
    expected = caption_direct(server, image)
    result = run(CLIENT, "--url", server, "CAPTION", str(image), env=base_env(tmpdir_env))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert result.stderr == ""
    result = run(CLIENT, "-n", "CAPTION", str(image), env=base_env(tmpdir_env, VISION_HOST=server))
    assert result.stdout == expected
    assert list(tmpdir_env.iterdir()) == []


def test_prompt_spellings(server: str, tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.jpg", 5)
    expected = caption_direct(server, image) + "\n"
    for spelling in ("CAPTION", "<CAPTION>", "caption", " <Caption> "):
        result = run(CLIENT, spelling, str(image), env=base_env(VISION_HOST=server))
        assert result.returncode == 0, (spelling, result.stderr)
        assert result.stdout == expected, spelling


def test_other_prompt_and_stdin_image(server: str, tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.webp", 7)
    expected = caption_direct(server, image, "<GENERATE_TAGS>")
    with open(image, "rb") as stdin:
        result = subprocess.run(
            [str(CLIENT), "generate_tags", "-"],
            stdin=stdin,
            capture_output=True,
            text=True,
            env=base_env(VISION_HOST=server),
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_prompts_model_status(server: str) -> None:
    env = base_env(VISION_HOST=server.removeprefix("http://"))  # host:port works too
    result = run(CLIENT, "prompts", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == http_json(server + "/prompts")[1]
    result = run(CLIENT, "model", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == http_json(server + "/model")[1] + "\n"
    result = run(CLIENT, "STATUS", env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert isinstance(status, dict) and "state" in status


def test_url_option_beats_environment(server: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = run(CLIENT, "--url", server, "model", env=base_env(VISION_HOST=dead))
    assert result.returncode == 0, result.stderr


def test_invalid_prompt(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    result = run(CLIENT, "NOT_A_TASK", str(image), env=base_env(tmpdir_env, VISION_HOST=server))
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Invalid prompt" in result.stderr and "HTTP 400" in result.stderr
    assert list(tmpdir_env.iterdir()) == []


def test_invalid_image(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a picture")
    result = run(CLIENT, "CAPTION", str(bad), env=base_env(VISION_HOST=server))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Invalid image data" in result.stderr


def test_local_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    for args in (
        ["CAPTION", str(tmp_path / "missing.png")],
        ["CAPTION", str(empty)],
        ["CAPTION"],
        ["--timeout", "soon", "model"],
        ["--bogus", "model"],
        [],
    ):
        result = run(CLIENT, *args)
        assert result.returncode == 2, args
        assert result.stdout == ""
        assert result.stderr


def test_client_names_the_image_on_one_line_whatever_its_name_holds(tmp_path: Path) -> None:
    r"""The messages "no such file", "not a readable file" and "the file is empty" name the image
    with its line break, tab and other control characters made visible (``\n``, ``\t``, ``\xNN``), as every
    report of the project names files. The name went out raw: a newline cut the folder script's
    reason (the message's last line) down to the name's tail, or made it pass for a line of its
    own, and an escape sequence reached the terminal."""
    name = "photo\nvision-client.sh: HTTP 200\t\x1b[31m.png"
    shown = "photo\\nvision-client.sh: HTTP 200\\t\\x1b[31m.png"
    missing = tmp_path / "missing" / name
    folder = tmp_path / "folder" / name
    folder.mkdir(parents=True)
    empty = tmp_path / "empty" / name
    empty.parent.mkdir()
    empty.touch()
    for path, said in (
        (missing, "no such file"),
        (folder, "not a readable file"),
        (empty, "the file is empty (0 bytes)"),
    ):
        result = run(CLIENT, "CAPTION", str(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"vision-client.sh: {said}: {path.parent}/{shown}\n"


def test_folder_names_an_image_gone_since_the_listing_on_one_line(tmp_path: Path, tmpdir_env: Path) -> None:
    r"""An image deleted after the run listed it fails with vision-client.sh's "no such file",
    its name on one line. The reason was the last line of that message: only the tail of a name
    with a newline in it ("spoof\x07.png")."""
    root = tmp_path / "data"
    _, gone = make_tree(root, ["a.png", "b\nspoof\x07.png"])
    command = [str(FOLDER), "--url", "", "--jobs", "1", "CAPTION", "txt", str(root)]
    # The first image's request is answered "busy, come back in 3 s": the second is deleted then,
    # before the script (one request at a time) gets to it.
    with StandIn(busy_first=1, busy_retry_after="3") as stand_in:
        command[2] = stand_in.url
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(tmpdir_env)
        )
        try:
            deadline = time.monotonic() + 30
            while not stand_in.posts() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(stand_in.posts()) == 1
            gone.unlink()
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, stderr
    assert f"  b\\nspoof\\x07.png: no such file: {root}/b\\nspoof\\x07.png\n" in stderr, stderr
    assert "spoof\x07" not in stderr, stderr


# Names as an archive made under another encoding unpacks them (bytes that are not UTF-8), beside
# valid UTF-8 names that must stay as they are: the Python tools' captionfiles.printable is the
# reference for how every tool says them.
NOT_UTF8 = [b"caf\xe9.png", b"\xed\xa0\x80 surrogate \xc0\xaf overlong \xf4\x90\x80\x80 big \xe2\x82.png"]
VALID_UTF8 = ["café.png".encode(), "猫 😀 ﬁ.png".encode()]
LOCALES = ["C", "C.UTF-8"]


def shown(name: bytes) -> bytes:
    """NAME (raw bytes) as the Python tools write it in their reports, as bytes."""
    return printable(os.fsdecode(name)).encode()


def run_bytes(*args: str | bytes | Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """run() for output that may hold any byte (the old scripts wrote names raw)."""
    return subprocess.run([os.fsencode(a) for a in args], capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize("locale", LOCALES)
def test_client_names_a_name_that_is_not_utf8_as_the_python_tools_do(tmp_path: Path, locale: str) -> None:
    r"""vision-client.sh's "no such file" writes each byte of the name that is not part of valid
    UTF-8 as \xNN, as captionfiles.printable does (caf\xe9.png); valid UTF-8 stays as it is,
    whatever the locale. The bytes went out raw."""
    assert shown(VALID_UTF8[0]) == VALID_UTF8[0] and shown(NOT_UTF8[0]) == b"caf\\xe9.png"
    env = base_env(LC_ALL=locale)
    folder = os.fsencode(tmp_path / "missing")
    for name in NOT_UTF8 + VALID_UTF8:
        result = run_bytes(CLIENT, "CAPTION", folder + b"/" + name, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr == b"vision-client.sh: no such file: " + folder + b"/" + shown(name) + b"\n"


@pytest.mark.parametrize("locale", LOCALES)
def test_folder_names_a_name_that_is_not_utf8_as_the_python_tools_do(tmp_path: Path, locale: str) -> None:
    r"""The folder script's progress lines, its failure list and the reasons in it (the images
    sharing a caption file) write the bytes of a name that are not part of valid UTF-8 as \xNN,
    as captionfiles.printable does; valid UTF-8 names stay as they are, whatever the locale."""
    root = tmp_path / "archive"
    good = [os.fsdecode(n) for n in (*VALID_UTF8, NOT_UTF8[1])]
    images = make_tree(root, [*good, os.fsdecode(b"pair\xe9.jpg"), os.fsdecode(b"pair\xe9.png")])
    (root / os.fsdecode(NOT_UTF8[0])).touch()  # empty: fails
    with StandIn() as stand_in:
        result = run_bytes(FOLDER, "--url", stand_in.url, "CAPTION", "txt", root, env=base_env(LC_ALL=locale))
    assert result.returncode == 1, result.stderr
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images[:3])
    for name in (*VALID_UTF8, NOT_UTF8[1]):
        assert b" ok " + shown(name) + b" (" in result.stderr, result.stderr
    summary = result.stderr[result.stderr.index(b"Failed images") :]
    assert b"\n  " + shown(NOT_UTF8[0]) + b": the file is empty (0 bytes)\n" in summary, summary
    assert b"\n  pair\\xe9.jpg: shares its caption file pair\\xe9.txt with pair\\xe9.png;" in summary
    assert b"\n  pair\\xe9.png: shares its caption file pair\\xe9.txt with pair\\xe9.jpg;" in summary
    assert not any(name in result.stderr for name in (*NOT_UTF8, b"pair\xe9")), result.stderr


def test_client_killed_with_kill_9_leaves_its_files_to_the_next_run(tmp_path: Path, tmpdir_env: Path) -> None:
    """kill -9 (script and curl, while the request is in flight): no trap runs, and the
    temporary directory (the encoded image, the curl config with the API key) stays. The next
    run removes it; it stayed for good."""
    image = save_image(tmp_path / "a.png", 0)
    env = base_env(tmpdir_env)
    with StandIn(hang=True) as hanging:
        proc = subprocess.Popen(
            ["bash", str(CLIENT), "--url", hanging.url, "CAPTION", str(image)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not hanging.posts() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(hanging.posts()) == 1
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    [left] = list(tmpdir_env.iterdir())
    assert left.name.startswith("vision-client.") and (left / "curlrc").exists()
    with StandIn() as stand_in:
        again = run(CLIENT, "--url", stand_in.url, "CAPTION", str(image), env=env)
    assert again.returncode == 0, again.stderr
    assert list(tmpdir_env.iterdir()) == []


def test_client_removes_only_the_temporary_directories_of_gone_runs(tmp_path: Path, tmpdir_env: Path) -> None:
    """A leftover is named vision-client.<host>.<pid>.<hex>: removed when the host is this one and
    the process is gone; a live run's, another host's, an older version's (no pid), a name the
    script does not make and a symlink stay."""
    gone = subprocess.Popen(["true"])
    gone.wait()

    def temp_dir(name: str) -> Path:
        path = tmpdir_env / name
        path.mkdir()
        (path / "body").write_text("{}")
        return path

    dead = temp_dir(f"vision-client.testhost.{gone.pid}.0123abcd")
    kept = [
        temp_dir(f"vision-client.testhost.{os.getpid()}.0123abcd"),  # a live run's
        temp_dir(f"vision-client.otherhost.{gone.pid}.0123abcd"),  # another host's: its pids are not ours
        temp_dir("vision-client.0123abcd"),  # older versions': no pid to tell by
        temp_dir(f"vision-client.testhost.{gone.pid}.0123abcd.mine"),  # not a name the script makes
    ]
    (tmpdir_env / f"vision-client.testhost.{gone.pid}.89abcdef").symlink_to(kept[0])  # a link: left alone
    kept.append(tmpdir_env / f"vision-client.testhost.{gone.pid}.89abcdef")
    image = save_image(tmp_path / "a.png", 0)
    with StandIn() as stand_in:
        result = run(
            CLIENT,
            "--url",
            stand_in.url,
            "CAPTION",
            str(image),
            env=base_env(tmpdir_env, HOSTNAME="testhost"),
        )
    assert result.returncode == 0, result.stderr
    assert not dead.exists()
    assert all(path.is_dir() for path in kept) and (kept[0] / "body").exists()
    assert sorted(p.name for p in tmpdir_env.iterdir()) == sorted(p.name for p in kept)  # its own went too


def test_dead_server(tmp_path: Path, tmpdir_env: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    dead = f"http://127.0.0.1:{free_port()}"
    result = run(CLIENT, "--url", dead, "CAPTION", str(image), env=base_env(tmpdir_env))
    assert result.returncode == 3
    assert result.stdout == ""
    assert "cannot connect" in result.stderr
    assert list(tmpdir_env.iterdir()) == []


@contextlib.contextmanager
def https_port(tmp_path: Path) -> Iterator[int]:
    """An HTTPS server (self-signed) answering 404 to everything; plain HTTP to it is hung up on."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_plain_http_to_an_https_port_says_use_https(tmp_path: Path, tmpdir_env: Path) -> None:
    """curl's "Empty reply from server" said nothing of why; the folder script stops at once."""
    image = save_image(tmp_path / "p.png", 1)
    with https_port(tmp_path) as port:
        plain = f"http://127.0.0.1:{port}"
        hint = f"{plain} hung up without an answer, and that port speaks HTTPS: use https://127.0.0.1:{port}"
        result = run(CLIENT, "--url", plain, "CAPTION", str(image), env=base_env(tmpdir_env))
        assert result.returncode == 3 and hint in result.stderr, result.stderr
        root = tmp_path / "tree"
        make_tree(root, ["a.png"])
        folder = run(FOLDER, "--url", plain, "CAPTION", "txt", str(root), env=base_env(tmpdir_env))
        assert folder.returncode == 3 and hint in folder.stderr and "waiting" not in folder.stderr
    assert list(tmpdir_env.iterdir()) == []


def test_timeout(tmp_path: Path, tmpdir_env: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    with StandIn(hang=True) as stand_in:
        started = time.monotonic()
        result = run(
            CLIENT, "--url", stand_in.url, "--timeout", "1", "CAPTION", str(image), env=base_env(tmpdir_env)
        )
    assert time.monotonic() - started < 10
    assert result.returncode == 4
    assert result.stdout == ""
    assert "within 1s" in result.stderr
    assert list(tmpdir_env.iterdir()) == []


def test_busy_server_and_retries(tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    with StandIn(busy_first=1) as stand_in:
        result = run(CLIENT, "--url", stand_in.url, "--retries", "0", "CAPTION", str(image))
        assert result.returncode == 5
        assert "HTTP 503" in result.stderr and "Queue full" in result.stderr
        assert result.stdout == ""
    with StandIn(busy_first=1) as stand_in:
        result = run(CLIENT, "--url", stand_in.url, "--retries", "2", "CAPTION", str(image))
        assert result.returncode == 0, result.stderr
        assert result.stdout == "stand-in caption\n"
        assert len(stand_in.posts()) == 2


def test_api_key(tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    key = 'k3y "with" \\ odd chars'
    with StandIn(key=key) as stand_in:
        result = run(CLIENT, "CAPTION", str(image), env=base_env(VISION_HOST=stand_in.url))
        assert result.returncode == 6
        assert "HTTP 401" in result.stderr and "VISION_API_KEY" in result.stderr
        result = run(
            CLIENT, "CAPTION", str(image), env=base_env(VISION_HOST=stand_in.url, VISION_API_KEY=key)
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "stand-in caption\n"


def test_folder_runs_are_bulk_and_single_captions_interactive(tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    with StandIn() as stand_in:
        assert run(CLIENT, "--url", stand_in.url, "CAPTION", str(image)).returncode == 0
        (single,) = stand_in.post_headers()
        assert "X-Priority" not in single  # the server's default lane: interactive
        result = run(FOLDER, "--url", stand_in.url, "CAPTION", "txt", str(tmp_path), env=base_env())
        assert result.returncode == 0, result.stderr
        (_, folder_run) = stand_in.post_headers()
    assert folder_run["X-Priority"] == "bulk" and folder_run["X-Client-Id"].startswith("folder-")


def test_large_image(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    """Far beyond any command-line length limit: the body must be streamed from a file."""
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (3000, 3000), dtype=np.uint8)
    image = tmp_path / "large.png"
    Image.fromarray(noise, "L").save(image, compress_level=1)
    assert len(base64.b64encode(image.read_bytes())) > 4 * 1024 * 1024
    expected = caption_direct(server, image)
    result = run(CLIENT, "CAPTION", str(image), env=base_env(tmpdir_env, VISION_HOST=server))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert list(tmpdir_env.iterdir()) == []


def test_without_jq(server: str, tmp_path: Path) -> None:
    """python3 takes over JSON building and parsing when jq is missing."""
    path = path_without(tmp_path, "jq")
    env = base_env(VISION_HOST=server, PATH=path)
    image = save_image(tmp_path / "p.png", 3)
    result = run(CLIENT, "<caption>", str(image), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == caption_direct(server, image) + "\n"
    assert run(CLIENT, "model", env=env).stdout == http_json(server + "/model")[1] + "\n"
    assert json.loads(run(CLIENT, "prompts", env=env).stdout) == http_json(server + "/prompts")[1]
    assert "state" in json.loads(run(CLIENT, "status", env=env).stdout)
    result = run(CLIENT, "nonsense", str(image), env=env)
    assert result.returncode != 0 and result.stdout == "" and "Invalid prompt" in result.stderr


def test_without_jq_or_python(tmp_path: Path) -> None:
    env = base_env(PATH=path_without(tmp_path, "jq", "python*"))
    result = run(CLIENT, "model", env=env)
    assert result.returncode == 2
    assert "jq or python3" in result.stderr


# ---------------------------------------------------------------------------------------------
# vision-caption-folder-images.sh

WEIRD_NAMES = [
    "plain.png",
    "with space.JPG",
    'quote\'s "double".jpeg',
    "back\\slash.PNG",
    "ünïcödé 画像.webp",
    "new\nline.gif",
    "x.BMP",
    "y.tif",
    "z.TiFF",
    "-dash.Jpg",
    "sub dir/inner.JPEG",
    "sub dir/deeper/deep.Webp",
    "sub dir/deeper/more.tiff",
]


def make_tree(root: Path, names: list[str]) -> list[Path]:
    return [save_image(root / name, seed) for seed, name in enumerate(names)]


def caption_path(image: Path, ext: str = "txt") -> Path:
    return image.with_suffix("." + ext)


def test_folder_weird_names_jobs(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    root = tmp_path / "data set"
    images = make_tree(root, WEIRD_NAMES)
    (root / "notes.md").write_text("not an image")
    (root / "image.png.bak").write_text("not an image either")
    expected = {image: as_file_caption(text) for image, text in captions_direct(server, images).items()}

    result = run(
        FOLDER,
        "--jobs",
        "4",
        "caption",
        "txt",
        str(root),
        env=base_env(tmpdir_env, VISION_HOST=server),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    for image, caption in expected.items():
        assert caption_path(image).read_text() == caption, image
    captions = sorted(p for p in root.rglob("*.txt"))
    assert captions == sorted(caption_path(image) for image in images)
    assert f"[{len(images)}/{len(images)}]" in result.stderr
    assert "img/s" in result.stderr and "ETA" in result.stderr
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def test_folder_caption_name_near_name_max(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    """A 248-byte stem: a 252-byte caption name fits, and the temp name must not be longer."""
    root = tmp_path / "long"
    (image,) = make_tree(root, ["a" * 248 + ".png"])
    result = run(FOLDER, "--url", server, "CAPTION", "txt", str(root), env=base_env(tmpdir_env))
    assert result.returncode == 0, result.stderr
    assert caption_path(image).read_text() == as_file_caption(caption_direct(server, image))
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def test_folder_no_recursive_and_other_cwd(server: str, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    top = make_tree(root, ["a.png", "b.jpg"])
    nested = make_tree(root, ["sub/c.png"])
    # Through a symlink, from an unrelated working directory: vision-client.sh is still found.
    link = tmp_path / "bin" / "caption-folder"
    link.parent.mkdir()
    link.symlink_to(FOLDER)
    result = run(
        link,
        "--no-recursive",
        "caption",
        ".cap",
        str(root),
        env=base_env(VISION_HOST=server),
        cwd=tmp_path / "bin",
    )
    assert result.returncode == 0, result.stderr
    assert all(caption_path(image, "cap").read_text() for image in top)
    assert not caption_path(nested[0], "cap").exists()


def test_folder_modes_prefix_suffix(server: str, tmp_path: Path) -> None:
    root = tmp_path / "modes"
    a, b = make_tree(root, ["a.png", "b.png"])
    new_a, new_b = (as_file_caption(text) for text in captions_direct(server, [a, b]).values())
    env = base_env(VISION_HOST=server)

    def folder(*args: str) -> subprocess.CompletedProcess[str]:
        result = run(FOLDER, *args, "CAPTION", "txt", str(root), env=env)
        assert result.returncode == 0, result.stderr
        return result

    caption_path(a).write_text("keep me\n")
    caption_path(b).write_text("")  # empty: captioned even in skip mode
    result = folder()  # skip is the default
    assert caption_path(a).read_text() == "keep me\n"
    assert caption_path(b).read_text() == new_b
    assert "1 captioned, 1 skipped" in result.stderr

    folder("--mode", "append", "--prefix", "ohwx, ", "--suffix", " END")
    assert caption_path(a).read_text() == f"keep me ohwx, {new_a} END"
    assert caption_path(b).read_text() == f"{new_b} ohwx, {new_b} END"

    caption_path(a).write_text("old")
    caption_path(b).unlink()
    folder("--mode", "prepend", "--separator", " | ")
    assert caption_path(a).read_text() == f"{new_a} | old"
    assert caption_path(b).read_text() == new_b

    folder("--mode=overwrite", "--prefix=trigger, ")
    assert caption_path(a).read_text() == f"trigger, {new_a}"
    assert caption_path(b).read_text() == f"trigger, {new_b}"

    result = folder("--mode", "skip")
    assert "0 captioned, 2 skipped" in result.stderr


def _file_size_limit(limit: int) -> None:
    """In the child: writes past ``limit`` bytes fail with "File too large" (EFBIG), as on a file
    system or quota with a size limit, instead of the SIGXFSZ that would kill the writer."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_folder_names_a_caption_it_cannot_write_on_one_line(tmp_path: Path, tmpdir_env: Path) -> None:
    """A caption file that the size limit refuses stops the run, naming the file with its newline
    and tab made visible, as every other message of the script does. The name went out raw, and
    the stop reason (passed on line by line) was cut at the newline: "cannot write .../new"."""
    root = tmp_path / "data"
    (image,) = make_tree(root, ["new\nline\tname.png"])
    caption_path(image).write_text("old words " * 10_000)  # 100 kB: appending goes past the limit
    with StandIn() as stand_in:
        result = subprocess.run(
            ["bash", str(FOLDER), "--url", stand_in.url, "--mode", "append", "CAPTION", "txt", str(root)],
            capture_output=True,
            text=True,
            env=base_env(tmpdir_env),
            timeout=60,
            preexec_fn=lambda: _file_size_limit(64 * 1024),
        )
    assert result.returncode == 1, result.stderr
    said = f"cannot write {root}/new\\nline\\tname.txt: file too large: no space left within the size limit"
    assert said in result.stderr, result.stderr
    assert "new\nline" not in result.stderr, result.stderr
    assert caption_path(image).read_text() == "old words " * 10_000  # untouched
    assert leftovers(root) == []


def test_folder_skip_counts_a_blank_caption_file_as_missing(server: str, tmp_path: Path) -> None:
    # A file of whitespace (or only a BOM) is what failed runs leave; vision-client and
    # vision-server caption caption such an image again, and so must the script.
    root = tmp_path / "blank"
    a, b, c = make_tree(root, ["a.png", "b.png", "c.png"])
    caption_path(a).write_text(" \n")
    caption_path(b).write_bytes(b"\xef\xbb\xbf\r\n")
    caption_path(c).write_text("kept")
    result = run(FOLDER, "CAPTION", "txt", str(root), env=base_env(VISION_HOST=server))
    assert result.returncode == 0, result.stderr
    assert "2 captioned, 1 skipped" in result.stderr
    assert caption_path(a).read_text().strip() and caption_path(b).read_text().strip()
    assert caption_path(c).read_text() == "kept"


def test_folder_failing_image(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    root = tmp_path / "mixed"
    good = make_tree(root, ["good1.png", "sub/good2.jpg", "pair.jpg", "pair.png"])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    result = run(FOLDER, "-j", "2", "CAPTION", "txt", str(root), env=base_env(tmpdir_env, VISION_HOST=server))
    assert result.returncode == 1
    assert not (root / "broken.txt").exists()
    for image in good[:2]:
        assert caption_path(image).read_text() == as_file_caption(caption_direct(server, image))
    summary = result.stderr[result.stderr.index("Failed images") :]
    assert "broken.png: HTTP 400: Invalid image data" in summary
    assert not (root / "pair.txt").exists()  # pair.jpg and pair.png would share it: neither is captioned
    assert "pair.jpg: shares its caption file pair.txt with pair.png;" in summary
    assert "pair.png: shares its caption file pair.txt with pair.jpg;" in summary
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def test_folder_case_rule_asks_the_file_system_and_folds_names_only_where_it_folds(tmp_path: Path) -> None:
    """The folder script's own folds_case and claim, in bash: on this disk (ext4) b.jpg looked up
    as B.JPG finds nothing, and where both spellings are files each is its own; only a folder
    the file system folds case in gets lower-cased caption keys (where b.txt is B.txt). The
    whole run on this disk, with both images captioned, is in test_dataset_tools_agree.py."""
    text = FOLDER.read_text(encoding="utf-8")
    functions = "\n".join(
        re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.M | re.S).group(0)  # type: ignore[union-attr]
        for name in ("folds_case", "claim")
    )
    pair = tmp_path / "pair"
    both = tmp_path / "both"
    for folder, names in ((pair, ("b.jpg", "B.png")), (both, ("c.jpg", "C.JPG"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"x")
    script = functions + (
        "declare -A folded=()\n"
        'folds_case "$1/b.jpg" && echo "pair folds" || echo "pair keeps case"\n'
        'folds_case "$2/c.jpg" && echo "both folds" || echo "both keep case"\n'
        'claim "$1/B.txt"; echo "$key"\n'
        "folded[$1]=1\n"
        'claim "$1/B.txt"; echo "$key"\n'
        'claim "$2/C.txt"; echo "$key"\n'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", str(pair), str(both)], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [
        "pair keeps case",
        "both keep case",
        f"{pair}/B.txt",
        f"{pair}/b.txt",
        f"{both}/C.txt",
    ]
    assert sorted(path.name for path in pair.iterdir()) == ["B.png", "b.jpg"]


def test_folder_dead_server(tmp_path: Path, tmpdir_env: Path) -> None:
    """Nothing listening: --wait-for-server 0 stops at once; a window is waited out first."""
    root = tmp_path / "dead"
    make_tree(root, ["a.png", "b.png", "sub/c.png"])
    before = sorted(root.rglob("*"))
    env = base_env(tmpdir_env, VISION_HOST=f"127.0.0.1:{free_port()}")
    result = run(FOLDER, "--wait-for-server", "0", "CAPTION", "txt", str(root), env=env)
    assert result.returncode == 3
    assert "cannot connect" in result.stderr and "waiting" not in result.stderr
    # The summary of every early stop, also at the first request (it ended with the message alone).
    stopped = "Stopped early, 3 image(s) not attempted: the server cannot be reached (cannot connect to "
    assert stopped in result.stderr and "3 image(s) found: 0 captioned" in result.stderr, result.stderr
    result = run(FOLDER, "--wait-for-server", "2", "CAPTION", "txt", str(root), env=env)
    assert result.returncode == 3, result.stderr
    assert "server not answering yet (cannot connect to http://127.0.0.1:" in result.stderr
    assert "waiting up to 2 s for it" in result.stderr
    stopped = (
        "Stopped early, 3 image(s) not attempted: the server cannot be reached (still not after waiting 2 s: "
    )
    assert stopped + "cannot connect to http://127.0.0.1:" in result.stderr, result.stderr
    assert sorted(root.rglob("*")) == before
    assert list(tmpdir_env.iterdir()) == []


def test_folder_run_waits_at_the_start_while_a_proxy_has_no_server(tmp_path: Path, tmpdir_env: Path) -> None:
    """Started while every server behind HAProxy restarts: the proxy's own 503/502 pages to the
    start-up probe are waited out (--wait-for-server) instead of stopping the run with exit 3."""
    root = tmp_path / "proxy-at-start"
    images = make_tree(root, ["a.png", "sub/b.png"])
    with StandIn(outage_after=0, outage_seconds=2.5) as proxy:
        result = run(FOLDER, "--url", proxy.url, "CAPTION", "txt", str(root), env=base_env(tmpdir_env))
    assert result.returncode == 0, result.stderr
    assert proxy.outage_answers >= 2  # the probe met the outage, and probed again
    assert "server not answering yet (cannot reach the server behind" in result.stderr
    assert "waiting up to 300 s" in result.stderr and "server answers; going on" in result.stderr
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images)
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def test_folder_wrong_address_fails_at_once(server: str, tmp_path: Path, tmpdir_env: Path) -> None:
    """A URL with a path (no vision-server there: 404) or an unknown VISION_MODEL stops the run
    at the start, whatever --wait-for-server says, rather than failing every image alike."""
    root = tmp_path / "wrong"
    make_tree(root, ["a.png", "b.png"])
    before = sorted(root.rglob("*"))
    result = run(FOLDER, "--url", f"{server}/v1", "CAPTION", "txt", str(root), env=base_env(tmpdir_env))
    assert result.returncode == 2, result.stderr
    assert "HTTP 404" in result.stderr and "check --url" in result.stderr and "waiting" not in result.stderr
    env = base_env(tmpdir_env, VISION_MODEL="no-such-model")
    result = run(FOLDER, "--url", server, "CAPTION", "txt", str(root), env=env)
    assert result.returncode == 2 and "no-such-model" in result.stderr and "VISION_MODEL" in result.stderr
    assert sorted(root.rglob("*")) == before and list(tmpdir_env.iterdir()) == []


def test_folder_invalid_prompt_stops(server: str, tmp_path: Path) -> None:
    root = tmp_path / "prompt"
    make_tree(root, [f"{i}.png" for i in range(8)])
    result = run(FOLDER, "--jobs", "2", "NO_SUCH_TASK", "txt", str(root), env=base_env(VISION_HOST=server))
    assert result.returncode == 7
    assert "Invalid prompt" in result.stderr and "Stopped early" in result.stderr
    assert list(root.rglob("*.txt")) == []


def test_folder_usage_errors(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.png"])
    for args in (
        ["CAPTION", "png", str(tmp_path)],
        ["CAPTION", "txt", str(tmp_path / "nope")],
        ["CAPTION", "txt"],
        ["--mode", "merge", "CAPTION", "txt", str(tmp_path)],
        ["--jobs", "0", "CAPTION", "txt", str(tmp_path)],
        ["--wait-for-server", "5m", "CAPTION", "txt", str(tmp_path)],
    ):
        result = run(FOLDER, *args)
        assert result.returncode == 2, args
        assert result.stderr
    assert not (tmp_path / "a.txt").exists()


def test_folder_interrupted(tmp_path: Path, tmpdir_env: Path) -> None:
    """Ctrl+C while requests are in flight: no caption files, no temporary files, exit 130."""
    root = tmp_path / "interrupt"
    make_tree(root, [f"img{i}.png" for i in range(6)])
    before = sorted(root.rglob("*"))
    with StandIn(hang=True) as stand_in:
        command = [str(FOLDER), "--url", stand_in.url, "--jobs", "3", "CAPTION", "txt", str(root)]
        env = base_env(tmpdir_env)
        returncode, stderr = interrupt_in_flight(command, stand_in, 3, env, wait=20, grace=10)
    assert returncode == 130, stderr
    assert "interrupted" in stderr.lower()
    assert sorted(root.rglob("*")) == before
    assert list(tmpdir_env.iterdir()) == []


def pausing_mv(tmp_path: Path, destination: str, nth: int) -> tuple[dict[str, str], Path, Path]:
    """A PATH whose ``mv``, ``ln`` and ``rm`` are the real ones, except that after their ``nth``
    rename, link or removal of a name matching ``destination`` (a shell pattern) they create a
    "moved" file and wait (up to 30 s) for a "release" file: a signal then lands at a known point
    of a folder run. (In skip mode the folder script publishes a caption file with ``ln``, then
    removes the temporary name with ``rm``; elsewhere it renames with ``mv``.)"""
    shims = tmp_path / "pausing-mv"
    shims.mkdir()
    count, moved, release = shims / "count", tmp_path / "moved", tmp_path / "release"
    for tool in ("mv", "ln", "rm"):
        real = shutil.which(tool)
        assert real
        (shims / tool).write_text(
            f"""#!/bin/sh
"{real}" "$@" || exit
for last; do :; done
case "${{last##*/}}" in {destination}) ;; *) exit 0 ;; esac
n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 ))
echo "$n" >"{count}"
[ "$n" -eq {nth} ] || exit 0
: >"{moved}"
i=0
while [ ! -e "{release}" ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
"""
        )
        (shims / tool).chmod(0o755)
    return {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}, moved, release


@pytest.mark.parametrize(
    "destination",
    [
        "*.txt",  # the worker is stopped after renaming its caption, before writing its result
        ".vision-caption.*.tmp",  # after the temporary name of a caption linked into place went
        "res.*",  # the worker wrote its result, the script had not read it yet
    ],
)
def test_folder_ctrl_c_counts_every_caption_file_written(
    tmp_path: Path, tmpdir_env: Path, destination: str
) -> None:
    """Ctrl+C (to the process group) just after the second image's caption file was renamed into
    place, before the script counted it: the summary says 2 captioned, as the files on disk,
    and only the two images without a new caption are "not captioned yet". (It said 1 captioned
    and "the images that were being captioned have no new caption".)"""
    root = tmp_path / "race"
    images = make_tree(root, [f"img{i}.png" for i in range(4)])
    path_env, moved, release = pausing_mv(tmp_path, destination, 2)
    with StandIn() as stand_in:
        proc = subprocess.Popen(
            [str(FOLDER), "--url", stand_in.url, "--jobs", "1", "CAPTION", "txt", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=base_env(tmpdir_env, **path_env),
            start_new_session=True,  # a process group of its own, like a terminal job
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 60
            while not moved.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the second rename never came"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGINT)  # pending for every process of the run from here on
            release.touch()
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, stderr
    written = sorted(path.name for path in root.glob("*.txt"))
    assert written == ["img0.txt", "img1.txt"], stderr
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images[:2])
    assert "4 image(s) found: 2 captioned, 0 skipped (caption exists), 0 failed" in stderr, stderr
    assert "Interrupted: 2 image(s) not captioned yet" in stderr, stderr
    assert "run the same command again to resume" in stderr
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def racing_mv(tmp_path: Path, made: str, *, knows_t: bool) -> dict[str, str]:
    """A PATH whose ``mv`` and ``ln`` make a folder (or a pipe) where ``img1.txt`` belongs just
    before they rename or link onto it: one made between the script's look and its rename, on
    cue. With ``knows_t`` false they refuse ``-T`` as BSD's (macOS) do."""
    shims = tmp_path / "racing-mv"
    shims.mkdir()
    make = "mkdir" if made == "folder" else "mkfifo"
    refuse_t = 'for a; do [ "$a" = -T ] && { echo "$0: illegal option -- T" >&2; exit 64; }; done'
    if knows_t:
        refuse_t = ""
    for tool in ("mv", "ln"):
        real = shutil.which(tool)
        assert real
        (shims / tool).write_text(
            f"""#!/bin/sh
{refuse_t}
for last; do :; done
case "$last" in */img1.txt) [ -e "$last" ] || {make} "$last" ;; esac
exec "{real}" "$@"
"""
        )
        (shims / tool).chmod(0o755)
    return {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("knows_t", [True, False], ids=["GNU mv", "BSD mv"])
@pytest.mark.parametrize(("mode", "made"), [("overwrite", "folder"), ("skip", "folder"), ("skip", "pipe")])
def test_folder_something_made_where_a_caption_belongs_just_before_the_rename_fails_the_image(
    tmp_path: Path, tmpdir_env: Path, mode: str, made: str, knows_t: bool
) -> None:
    """A folder made where a caption belongs between the script's look and its rename took the
    caption inside it (mv and ln put a file into a folder they are given), and the image counted
    as captioned; a pipe made there in skip mode was replaced. Now the image fails in the
    planning's words, and what was made stays as it was, empty."""
    root = tmp_path / "race"
    make_tree(root, [f"img{i}.png" for i in range(3)])
    mode_args = ["--mode", mode]
    with StandIn() as stand_in:
        result = run(
            FOLDER,
            "--url",
            stand_in.url,
            "--jobs",
            "1",
            *mode_args,
            "CAPTION",
            "txt",
            str(root),
            env=base_env(tmpdir_env, **racing_mv(tmp_path, made, knows_t=knows_t)),
        )
    assert result.returncode == 1, result.stderr
    target = root / "img1.txt"
    if made == "folder":
        assert target.is_dir() and list(target.iterdir()) == [], result.stderr
        reason = "img1.txt is a directory, not a caption file"
    else:
        assert stat.S_ISFIFO(target.lstat().st_mode), result.stderr
        reason = "img1.txt is not a regular file (a pipe, socket or device), not a caption file"
    assert any(line.endswith(f"img1.png: {reason}") for line in result.stderr.splitlines()), result.stderr
    summary = "3 image(s) found: 2 captioned, 0 skipped (caption exists), 1 failed"
    assert summary in result.stderr, result.stderr
    assert sorted(path.name for path in root.glob("img[02].txt")) == ["img0.txt", "img2.txt"]
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


@pytest.mark.parametrize("target", ["request", "worker"])
def test_folder_image_whose_request_a_signal_stops_is_sent_again_not_failed(
    tmp_path: Path, tmpdir_env: Path, target: str
) -> None:
    """SIGTERM to one image's vision-client.sh (``request``), or to the folder script's worker
    shell that runs it (``worker``), while the run goes on: nothing is wrong with that image, so
    it is sent again and captioned, and the run ends with exit 0. (It was reported as FAILED,
    "vision-client.sh exit status 143" or "the worker stopped unexpectedly"; under Ctrl+C that
    made an image in flight count as failed instead of not captioned yet.)"""
    root = tmp_path / "stopped"
    images = make_tree(root, ["a.png", "b.png"])
    with StandIn(hang=True) as stand_in:
        proc = subprocess.Popen(
            [str(FOLDER), "--url", stand_in.url, "--jobs", "1", "CAPTION", "txt", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=base_env(tmpdir_env),
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while len(stand_in.posts()) < 1:
                assert proc.poll() is None and time.monotonic() < deadline, "no request came"
                time.sleep(0.02)
            if target == "request":
                victims = named(group_members(proc.pid), "vision-client.sh")
            else:
                victims = [p for p in psutil.Process(proc.pid).children() if named([p], FOLDER.name)]
            assert len(victims) == 1, victims
            victims[0].send_signal(signal.SIGTERM)
            victims[0].wait(10)
            stand_in.hang = False  # the image sent again is captioned at once
            stand_in.release.set()
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert "FAILED" not in stderr and "0 failed" in stderr, stderr
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images)
    assert len(stand_in.posts()) == 3  # a.png twice
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


@pytest.fixture
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server process whose (fake) captioner holds each batch of one image for 30 s.

    Requests stay in flight for as long as a signal test needs; the key makes the clients write
    it into their curl config files. One per test, so no test sees another's abandoned jobs.
    """
    tmp = tmp_path_factory.mktemp("slow-server")
    settings: dict[str, Any] = {"max_batch_size": 1, "api_key": SIGNAL_KEY}
    with ServerProcess.fake(tmp, "slow", delay=30, **settings) as process:
        yield process.wait_listening()


SIGNAL_KEY = "key-for-the-signal-tests"


def group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def named(processes: list[psutil.Process], name: str) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if any(name in part for part in process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize(
    ("how", "signum", "code"),
    [
        ("group", signal.SIGINT, 130),  # a terminal's Ctrl+C signals the whole foreground group
        ("group", signal.SIGTERM, 143),  # systemd, docker stop, kill -- -PGID
        ("timeout", signal.SIGINT, 130),  # timeout -s INT signals its child, then its own group
    ],
)
def test_folder_signal_leaves_no_child_and_no_temp_file(
    slow_server: str, tmp_path: Path, tmpdir_env: Path, how: str, signum: signal.Signals, code: int
) -> None:
    """--jobs 4 with four requests in flight: every process of the run stops, nothing is left."""
    root = tmp_path / "signal"
    make_tree(root, [f"img{i}.png" for i in range(8)])
    before = sorted(root.rglob("*"))
    command = [str(FOLDER), "--url", slow_server, "--jobs", "4", "CAPTION", "txt", str(root)]
    if how == "timeout":
        command = ["timeout", "-s", signum.name, "120", *command]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=base_env(tmpdir_env, VISION_API_KEY=SIGNAL_KEY),
        start_new_session=True,  # a process group of its own, like a terminal job
        # A shell cannot trap a signal it was started with ignored (pytest run with "&").
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            members = group_members(proc.pid)
            if len(named(members, "curl")) == 4 and len(named(members, "vision-client.sh")) == 4:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"four requests never got in flight: {proc.poll()=}")
        curl_configs = list(tmpdir_env.glob("vision-caption.*/vision-client.*/curlrc"))  # inside the run's
        assert len(curl_configs) == 4
        for config in curl_configs:
            assert SIGNAL_KEY in config.read_text()
            assert config.stat().st_mode & 0o777 == 0o600, oct(config.stat().st_mode)
        if how == "timeout":
            proc.send_signal(signum)  # timeout passes it on to the script, then to its group
        else:
            os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=20)
    finally:
        leftover = []
        for process in group_members(proc.pid):
            with contextlib.suppress(psutil.Error):
                leftover.append(" ".join(process.cmdline())[:120])
                process.kill()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert leftover == []
    assert proc.returncode == code, stderr
    assert "interrupted" in stderr.lower()
    assert list(tmpdir_env.iterdir()) == []
    assert sorted(root.rglob("*")) == before


def test_folder_retries_busy_server(tmp_path: Path) -> None:
    root = tmp_path / "busy"
    images = make_tree(root, ["a.png", "b.png"])
    with StandIn(busy_first=1) as stand_in:
        result = run(
            FOLDER, "--url", stand_in.url, "--jobs", "1", "--retries", "2", "CAPTION", "txt", str(root)
        )
    assert result.returncode == 0, result.stderr
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images)
    with StandIn(busy_first=100) as stand_in:
        result = run(FOLDER, "--url", stand_in.url, "--retries", "0", "CAPTION", "cap", str(root))
    assert result.returncode == 5
    assert "Stopped early" in result.stderr and "Queue full" in result.stderr
    assert list(root.rglob("*.cap")) == []


def test_folder_run_outlives_a_server_restart(tmp_path: Path, tmpdir_env: Path) -> None:
    """SIGKILL the server mid-run, start it again on the same port a few seconds later.

    The images in flight fail to connect (curl exit 7, or a broken reply): the run pauses, waits
    for the server, sends them again and ends with every image captioned and exit 0.
    """
    root = tmp_path / "restart"
    images = make_tree(root, [f"img{i:02}.png" for i in range(12)])

    def command(url: str) -> list[str]:
        return [str(FOLDER), "--url", url, "--jobs", "4", "CAPTION", "txt", str(root)]

    returncode, stderr = run_across_a_restart(
        tmp_path,
        command,
        base_env(tmpdir_env),
        lambda: bool(list(root.glob("*.txt"))),
        delay=0.5,
        down=3,
        port=free_port(),
        max_batch_size=2,
    )
    assert returncode == 0, stderr
    assert "server unreachable; waiting up to 300 s for it to come back" in stderr
    assert "server back; going on" in stderr
    assert all(caption_path(image).read_text() for image in images)
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []


def test_folder_leaves_hidden_names_out_with_and_without_subfolders(tmp_path: Path) -> None:
    """find lists no hidden file and enters no hidden folder below the folder, which may be
    hidden itself (a plain -name '.*' -prune would prune the folder given, and caption nothing)."""
    root = hidden_names.make_tree(tmp_path / ".data")
    before = hidden_names.files_below(root)
    with StandIn() as stand_in:
        flat = run(FOLDER, "--url", stand_in.url, "--no-recursive", "CAPTION", "txt", str(root))
        assert flat.returncode == 0, flat.stderr
        assert hidden_names.files_below(root) == before | {"a.txt"}
        deep = run(FOLDER, "--url", stand_in.url, "CAPTION", "txt", str(root))
        assert deep.returncode == 0, deep.stderr
        assert len(stand_in.posts()) == 2  # a.png once, then sub/b.png: a.txt is skipped
    assert hidden_names.files_below(root) == before | {"a.txt", "sub/b.txt"}


def test_folder_temp_names_and_sweep_of_a_killed_runs_leftovers(tmp_path: Path) -> None:
    """Temp captions are named as the Python clients name them, so every client sweeps them;
    the script itself deletes the stale ones (older than 15 minutes) in the folders it captions."""
    root = tmp_path / "swept"
    images = make_tree(root, ["a.png", "sub/b.png"])
    stale = [caption_temp(root, "0123456789abcdef", OLD), caption_temp(root / "sub", "fedcba9876543210", OLD)]
    legacy = aged(root / ".vision-caption.4242.7.tmp", OLD)  # what older versions of the script left
    young = caption_temp(root, "00112233445566ff", YOUNG)  # perhaps another run writing right now
    kept = [
        young,
        aged(root / ".vision-caption.0123456789ABCDEF.tmp", OLD),  # not a name of ours
        aged(root / ".vision-caption.0123.tmp", OLD),
        aged(root / "notes.tmp", OLD),
    ]
    (root / ".vision-caption.aaaaaaaaaaaaaaaa.tmp").symlink_to(images[0])  # a link, not a regular file
    kept.append(root / ".vision-caption.aaaaaaaaaaaaaaaa.tmp")
    # A logging mv and ln in front of the real ones show the temp names the script puts into
    # place (with ln in skip mode, so that a caption written meanwhile is never replaced), and a
    # logging sync that each is flushed to the disk first, as the Python tools flush them.
    shims = tmp_path / "shims"
    shims.mkdir()
    log, synced_log = tmp_path / "mv.log", tmp_path / "sync.log"
    for tool in ("mv", "ln", "sync"):
        real = shutil.which(tool)
        assert real
        into = synced_log if tool == "sync" else log
        (shims / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{into}"\nexec "{real}" "$@"\n')
        (shims / tool).chmod(0o755)
    env = base_env(PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
    with StandIn() as stand_in:
        flat = run(FOLDER, "--url", stand_in.url, "--no-recursive", "CAPTION", "txt", str(root), env=env)
        assert flat.returncode == 0, flat.stderr
        assert "removed 2 leftover temporary caption file(s)" in flat.stderr  # not the one in sub/
        assert [p.exists() for p in (stale[0], legacy, stale[1])] == [False, False, True]
        deep = run(FOLDER, "--url", stand_in.url, "CAPTION", "txt", str(root), env=env)
    assert deep.returncode == 0, deep.stderr
    assert "removed 1 leftover temporary caption file(s)" in deep.stderr
    assert not stale[1].exists()
    assert all(p.is_symlink() or p.exists() for p in kept)
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images)
    renamed = [Path(line).name for line in log.read_text().splitlines() if ".vision-caption." in line]
    assert len(renamed) == 2
    assert all(re.fullmatch(r"\.vision-caption\.[0-9a-f]{16}\.tmp", name) for name in renamed), renamed
    synced = [Path(line).name for line in synced_log.read_text().splitlines() if ".vision-caption." in line]
    assert sorted(synced) == sorted(renamed)


def test_folder_sweep_skips_hidden_folders_below_the_root(tmp_path: Path) -> None:
    """.git or .cache are no part of the dataset: the sweep does not walk them (a big .git is
    slow), as the listing does not; a hidden root is swept as usual."""
    root = tmp_path / ".datasets" / "x"
    make_tree(root, ["a.png", "sub/b.png"])
    swept = [caption_temp(root, "0123456789abcdef", OLD), caption_temp(root / "sub", "0123456789abcdef", OLD)]
    kept = [
        caption_temp(root / ".git" / "objects", "0123456789abcdef", OLD),
        caption_temp(root / "sub" / ".cache", "0123456789abcdef", OLD),
    ]
    with StandIn() as stand_in:
        result = run(FOLDER, "--url", stand_in.url, "CAPTION", "txt", str(root), env=base_env())
    assert result.returncode == 0, result.stderr
    assert "removed 2 leftover temporary caption file(s)" in result.stderr
    assert not any(path.exists() for path in swept) and all(path.exists() for path in kept)


def test_folder_killed_with_its_requests_leaves_tmpdir_clean_after_the_next_run(tmp_path: Path) -> None:
    """kill -9 of the whole run (script, workers, vision-client.sh, curl) while requests are in
    flight: no trap runs. Every file of that run is in its work directory (each vision-client.sh
    keeps its own, the encoded image among them, inside it), which the next run removes."""
    scratch = tmp_path / "script-tmp"
    scratch.mkdir()
    root = tmp_path / "data"
    make_tree(root, ["a.png", "b.png", "c.png"])
    env = base_env(scratch)
    command = [str(FOLDER), "--jobs", "2", "CAPTION", "txt", str(root)]
    with StandIn(hang=True) as hanging:
        proc = subprocess.Popen(
            [*command, "--url", hanging.url],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while len(hanging.posts()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(hanging.posts()) == 2
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    [left] = list(scratch.iterdir())  # the killed run's work directory, its clients' inside it
    assert left.name.startswith("vision-caption.")
    with StandIn() as stand_in:
        again = run(FOLDER, "--url", stand_in.url, *command[1:], env=env)
    assert again.returncode == 0, again.stderr
    assert list(scratch.iterdir()) == []
    assert all(caption_path(image).read_text() == "stand-in caption" for image in root.glob("*.png"))


def test_folder_removes_the_work_directory_a_killed_run_left_and_only_that(tmp_path: Path) -> None:
    """kill -9 leaves the script's work directory in TMPDIR (no trap runs). Its name holds host
    and pid, so the next run removes those of this host whose process is gone, and keeps a live
    run's, another host's, and anything it did not make."""
    scratch = tmp_path / "script-tmp"
    scratch.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()

    def work_dir(name: str) -> Path:
        path = scratch / name
        path.mkdir()
        (path / "res.0").write_text("0\n")
        return path

    dead = work_dir(f"vision-caption.testhost.{gone.pid}.0123abcd")
    kept = [
        work_dir(f"vision-caption.testhost.{os.getpid()}.0123abcd"),  # a live run's
        work_dir(f"vision-caption.otherhost.{gone.pid}.0123abcd"),  # another host's: its pids are not ours
        work_dir("vision-caption.0123abcd"),  # older versions': no pid to tell by
        work_dir(f"vision-caption.testhost.{gone.pid}.0123abcd.mine"),  # not a name the script makes
    ]
    (scratch / f"vision-caption.testhost.{gone.pid}.89abcdef").symlink_to(kept[0])  # a link: left alone
    kept.append(scratch / f"vision-caption.testhost.{gone.pid}.89abcdef")
    root = tmp_path / "data"
    make_tree(root, ["a.png"])
    with StandIn() as stand_in:
        result = run(
            FOLDER,
            "--url",
            stand_in.url,
            "CAPTION",
            "txt",
            str(root),
            env=base_env(scratch, HOSTNAME="testhost"),
        )
    assert result.returncode == 0, result.stderr
    assert not dead.exists()
    assert all(path.is_dir() for path in kept) and (kept[0] / "res.0").exists()
    assert sorted(p.name for p in scratch.iterdir()) == sorted(p.name for p in kept)  # its own went too


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: new connections get no answer at all
    (SYNs dropped), as a host that is down or rebooting (10.255.255.1 fails fast here)."""
    server_sock = socket.socket()
    server_sock.bind(("127.0.0.1", 0))
    server_sock.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(server_sock.getsockname())
        fillers.append(filler)
    return server_sock, fillers


def test_connect_timeout_is_an_unreachable_server_not_a_slow_answer(tmp_path: Path, tmpdir_env: Path) -> None:
    """curl's exit 28 before the connection opened is exit 3 (the folder script waits for the
    server); a slow answer stays exit 4 (test_timeout)."""
    image = save_image(tmp_path / "p.png", 1)
    server_sock, fillers = black_hole()
    try:
        host, port = server_sock.getsockname()
        result = run(
            CLIENT,
            "--url",
            f"{host}:{port}",
            "--timeout",
            "2",
            "CAPTION",
            str(image),
            env=base_env(tmpdir_env),
        )
    finally:
        for sock in (server_sock, *fillers):
            sock.close()
    assert result.returncode == 3, result.stderr
    assert "cannot connect to" in result.stderr and "is the host up?" in result.stderr
    assert result.stdout == "" and list(tmpdir_env.iterdir()) == []


def test_proxy_without_a_server_is_unreachable_and_own_503_is_busy(tmp_path: Path) -> None:
    image = save_image(tmp_path / "p.png", 1)
    with StandIn(outage_after=0, outage_seconds=60) as proxy:
        result = run(CLIENT, "--url", proxy.url, "--retries", "0", "CAPTION", str(image))
    assert result.returncode == 3, result.stderr
    assert "the proxy answers HTTP 503 (503 Service Unavailable No server is available.)" in result.stderr
    with StandIn(busy_first=1) as busy:
        result = run(CLIENT, "--url", busy.url, "--retries", "0", "CAPTION", str(image))
    assert result.returncode == 5 and "Queue full" in result.stderr


def test_folder_run_waits_while_a_proxy_has_no_server(tmp_path: Path, tmpdir_env: Path) -> None:
    """Every server behind HAProxy restarts: its bare 502/503 pages pause the run (after
    --retries) instead of stopping it as a busy server; every image ends captioned. The outage
    outlasts the one retry's back-off (at most 0.5 s) with room for a slow CI machine (at 3 s a
    late first request's retry could already find the server back, so the pause was never seen)."""
    root = tmp_path / "behind-proxy"
    images = make_tree(root, [f"img{i}.png" for i in range(8)])
    with StandIn(outage_after=2, outage_seconds=8) as proxy:
        result = run(
            FOLDER, "--url", proxy.url, "--jobs", "2", "--retries", "1", "CAPTION", "txt", str(root),
            env=base_env(tmpdir_env), timeout=90,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert proxy.outage_answers >= 2
    assert (
        "server unreachable; waiting up to 300 s" in result.stderr
        and "server back; going on" in result.stderr
    )
    assert all(caption_path(image).read_text() == "stand-in caption" for image in images)
    assert leftovers(root) == [] and list(tmpdir_env.iterdir()) == []
