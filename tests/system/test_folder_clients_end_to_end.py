"""Both folder clients on a messy dataset, and a server killed mid-run, as real processes.

The bash script ``clients/vision-caption-folder-images.sh`` and the Python ``vision-client
folder`` run as real subprocesses against a real ``vision-server serve --model test:tiny``
(started once for the module). Everything is judged by the files on disk, the clients' exit
status and summary, and the server's own counters in ``/v1/status``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import images, paths
from tests.support.api import tiny_cache_dir
from tests.support.processes import ServerProcess, free_port, tiny_server

REPO = paths.REPO
FOLDER_SCRIPT = REPO / "clients" / "vision-caption-folder-images.sh"
VISION_CLIENT = Path(sys.executable).with_name("vision-client")
CLIENTS = ("bash", "python")
# Both servers of this module must caption alike, so they share these settings.

# The messy dataset: 18 good images, one corrupt, one empty, one with a hand-written caption.
GOOD = [
    "plain.jpg",
    "UPPER.JPG",
    "Shout.PNG",
    "with space.png",
    'it\'s "quoted".jpeg',
    "back\\slash.bmp",
    "caf\u00e9 \u732b.webp",
    "dots.in.name.gif",
    "scan.tif",
    "upper tiff.TIFF",
    "sub/nested.png",
    "sub/deeper dir/deep one.jpg",
    "sub/deeper dir/\u00dcn\u00efc\u00f8d\u00e9.WEBP",
    "sub/deeper dir/-starts-with-dash.png",
    "\u0434\u0440\u0443\u0433\u043e\u0439/\u043a\u0430\u0442\u0430\u043b\u043e\u0433.png",
    "other/has caption.png",
    "other/x.Jpeg",
    "other/y.bmp",
]
CORRUPT = "broken.jpg"
EMPTY = "empty.PNG"
CAPTIONED = "other/has caption.png"
OLD_CAPTION = "old words, written by hand"


# ---------------------------------------------------------------------------------------------
# Servers


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def launch_server(tmp: Path, factory: pytest.TempPathFactory, name: str, *extra: str) -> ServerProcess:
    """The tiny server with 32-token captions (and ``extra`` options)."""
    return tiny_server(tmp, tiny_cache_dir(factory), "--max-new-tokens", "32", *extra, name=name)


def wait_ready(process: ServerProcess) -> str:
    """The URL of a launched server, once its model is loaded."""
    url = process.wait_listening(timeout=90)
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(OSError, ValueError):
            if get_json(url + "/v1/status")["state"] == "ready":
                return url
        assert process.process.poll() is None, process.log_text()[-3000:]
        assert time.monotonic() < deadline, process.log_text()[-3000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch_server(tmp_path_factory.mktemp("acceptance-server"), tmp_path_factory, "server") as process:
        yield wait_ready(process)
        process.send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)


def counters(url: str) -> tuple[int, int]:
    """(jobs_done, batches_run) of a server."""
    status = get_json(url + "/v1/status")
    return status["jobs_done"], status["batches_run"]


_EXPECTED: dict[bytes, str] = {}


def expected_captions(url: str, images: list[Path]) -> dict[Path, str]:
    """What the server answers for each image over the plain native API (cached by content)."""

    def one(data: bytes) -> None:
        body = json.dumps({"image": base64.b64encode(data).decode(), "prompt": "<CAPTION>"}).encode()
        request = urllib.request.Request(url + "/process_image", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            text = json.loads(response.read())["result"].strip()
        assert text
        _EXPECTED[hashlib.sha256(data).digest()] = " ".join(text.splitlines())

    contents = {image: image.read_bytes() for image in images}
    by_digest = {hashlib.sha256(data).digest(): data for data in contents.values()}
    missing = [data for key, data in by_digest.items() if key not in _EXPECTED]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, missing))
    return {image: _EXPECTED[hashlib.sha256(data).digest()] for image, data in contents.items()}


# ---------------------------------------------------------------------------------------------
# Datasets


def save_image(path: Path, seed: int) -> Path:
    """Random pixels (so captions differ), in the format the suffix names, in any case."""
    return images.save(path, seed, (44 + seed % 7, 36))


def make_messy_folder(root: Path) -> list[Path]:
    """Good images in mixed formats, a corrupt one, an empty one, a captioned one; returns the good."""
    good = [save_image(root / name, seed) for seed, name in enumerate(GOOD)]
    whole = (root / "plain.jpg").read_bytes()
    (root / CORRUPT).write_bytes(whole[:200] + b"\x00 cut off here" * 20)
    (root / EMPTY).write_bytes(b"")
    (root / CAPTIONED).with_suffix(".txt").write_text(OLD_CAPTION, encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    return good


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def caption_of(image: Path) -> Path:
    return image.with_suffix(".txt")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Running the clients


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def counts(self, client: str) -> tuple[int, int, int]:
        """(captioned, skipped, failed) from the client's summary line."""
        pattern = {
            "bash": r"(\d+) captioned, (\d+) skipped \(caption exists\), (\d+) failed",
            "python": r"(\d+) captioned, (\d+) skipped, (\d+) failed of \d+ images",
        }[client]
        found = re.findall(pattern, self.stderr)
        assert found, self.stderr[-3000:]
        captioned, skipped, failed = found[-1]
        return int(captioned), int(skipped), int(failed)

    def failure_list(self) -> str:
        """The summary's list of failed images."""
        marker = "ailed images"  # bash: "Failed images (...)", python: "failed images:"
        assert marker in self.stderr, self.stderr[-3000:]
        return self.stderr[self.stderr.rindex(marker) :]


def client_env(tmpdir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def client_command(client: str, url: str, folder: Path, *options: str, parallel: int = 8) -> list[str]:
    """The folder command of one client: CAPTION task, .txt captions, `parallel` requests."""
    if client == "bash":
        return [
            "bash",
            str(FOLDER_SCRIPT),
            "--url",
            url,
            "--jobs",
            str(parallel),
            *options,
            "CAPTION",
            "txt",
            str(folder),
        ]
    return [
        str(VISION_CLIENT),
        "--url",
        url,
        "folder",
        str(folder),
        "--task",
        "CAPTION",
        "--ext",
        "txt",
        "--concurrency",
        str(parallel),
        *options,
    ]


def run_client(
    client: str, url: str, folder: Path, *options: str, tmpdir: Path | None = None, parallel: int = 8
) -> Result:
    done = subprocess.run(
        client_command(client, url, folder, *options, parallel=parallel),
        capture_output=True,
        env=client_env(tmpdir),
        timeout=120,
        check=False,
    )
    stdout, stderr = (data.decode("utf-8", "replace") for data in (done.stdout, done.stderr))
    return Result(done.returncode, stdout, stderr)


def run_in_terminal(command: list[str], timeout: float = 120) -> Result:
    """Run with stderr on a pseudo-terminal, as in an interactive shell, so tqdm draws its bar."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the last writer has closed the terminal
            while data := os.read(master, 65536):
                chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        with subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=client_env()
        ) as process:
            os.close(slave)
            slave = -1
            reader.start()
            stdout, _ = process.communicate(timeout=timeout)
        reader.join(10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    stderr = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return Result(process.returncode, stdout.decode("utf-8", "replace"), stderr)


# ---------------------------------------------------------------------------------------------
# The messy folder


@pytest.mark.parametrize("client", CLIENTS)
def test_messy_folder(client: str, server: str, tmp_path: Path) -> None:
    root = tmp_path / "data set"
    good = make_messy_folder(root)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    expected = expected_captions(server, good)
    before = snapshot(root)
    jobs_before, batches_before = counters(server)

    prefix, suffix = "ohwx, \u00e9t\u00e9 ", ' -- "end"'
    options = ["--prefix", prefix, "--suffix", suffix]
    if client == "python":  # the way a user sees it: stderr on a terminal, with a progress bar
        first = run_in_terminal(client_command(client, server, root, *options))
    else:
        first = run_client(client, server, root, *options, tmpdir=scratch)

    # Non-zero exit, and a summary that names exactly the two bad images.
    assert first.returncode == 1, first.stderr[-3000:]
    assert first.counts(client) == (len(good) - 1, 1, 2)
    failures = first.failure_list()
    assert CORRUPT in failures and EMPTY in failures
    assert not any(Path(name).name in failures for name in GOOD)

    # On disk: the old files are untouched (the hand-written caption too), and the only new
    # files are the captions of the good images: nothing for the bad ones, no temporary files.
    after = snapshot(root)
    assert {name: after[name] for name in before} == before
    new_captions = {caption_of(image) for image in good if image != root / CAPTIONED}
    assert set(after) - set(before) == {p.relative_to(root).as_posix() for p in new_captions}
    for image in (image for image in good if image != root / CAPTIONED):
        assert caption_of(image).read_text(encoding="utf-8") == prefix + expected[image] + suffix, image
    assert temp_files(root) == []
    assert list(scratch.iterdir()) == []

    # The server captioned exactly the images without a caption; with 8 requests in flight the
    # Python client made it batch them, and it drew a progress bar.
    jobs_after, batches_after = counters(server)
    assert jobs_after - jobs_before == len(good) - 1
    if client == "python":
        assert batches_after - batches_before < jobs_after - jobs_before  # some batch held > 1 image
        assert re.search(r"100%\|[^\n]*\| 20/20 \[", first.stderr), first.stderr[-2000:]
        assert re.search(r"img/s|s/img", first.stderr)

    # A second run changes nothing and sends nothing the model has to caption.
    second = run_client(client, server, root, *options, tmpdir=scratch)
    assert second.returncode == 1
    assert second.counts(client) == (0, len(good), 2)
    assert snapshot(root) == after
    assert counters(server)[0] == jobs_after
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("mode", ["skip", "overwrite", "append", "prepend"])
@pytest.mark.parametrize("client", CLIENTS)
def test_existing_caption_modes(client: str, mode: str, server: str, tmp_path: Path) -> None:
    root = tmp_path / "modes"
    old = save_image(root / "has caption.png", 1)
    fresh = save_image(root / "sub" / "NEW ONE.JPG", 2)
    caption_of(old).write_text(OLD_CAPTION, encoding="utf-8")
    # A folder where a caption file should go: every mode fails that image, none skips it or
    # writes into the folder.
    boxed = save_image(root / "boxed.png", 3)
    caption_of(boxed).mkdir()
    (caption_of(boxed) / "keep.txt").write_text("mine", encoding="utf-8")
    expected = expected_captions(server, [old, fresh])
    result = run_client(client, server, root, "--mode", mode, "--suffix", " #x")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "boxed.txt is a directory, not a caption file" in result.failure_list()
    assert [p.name for p in caption_of(boxed).iterdir()] == ["keep.txt"]
    new = expected[old] + " #x"
    assert (
        caption_of(old).read_text(encoding="utf-8")
        == {
            "skip": OLD_CAPTION,
            "overwrite": new,
            "append": f"{OLD_CAPTION} {new}",
            "prepend": f"{new} {OLD_CAPTION}",
        }[mode]
    )
    assert caption_of(fresh).read_text(encoding="utf-8") == expected[fresh] + " #x"
    assert result.counts(client) == ((1, 1, 1) if mode == "skip" else (2, 0, 1))
    assert temp_files(root) == []


# ---------------------------------------------------------------------------------------------
# A server that dies halfway


def count_captions(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.txt"))


def test_server_killed_halfway(server: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGKILL the server while both clients run: no bad caption file; a re-run finishes the rest."""
    # A doomed server that waits 300 ms for each batch to fill: with two requests in flight per
    # client that is a few images per second, slow enough to kill it halfway. It starts while
    # the healthy server captions the images for reference.
    running: dict[str, subprocess.Popen[bytes]] = {}
    with launch_server(tmp_path, tmp_path_factory, "doomed", "--max-batch-wait-ms", "300") as doomed:
        folders = {client: tmp_path / client for client in CLIENTS}
        images = {
            client: [save_image(folder / f"img {i:02d}.png", 100 + i) for i in range(40)]
            for client, folder in folders.items()
        }
        expected = expected_captions(server, images["bash"] + images["python"])
        scratch = tmp_path / "tmpdir"
        scratch.mkdir()
        url = wait_ready(doomed)
        try:
            for client in CLIENTS:  # one after the other, each until it has a few captions
                # A server that stays away: each waits 2 s for it (not the default 300), then stops.
                command = client_command(client, url, folders[client], "--wait-for-server=2", parallel=2)
                if client == "python":
                    command[1:1] = ["--retries", "1"]  # an option of the group, before "folder"
                running[client] = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(scratch)
                )
                deadline = time.monotonic() + 60
                while count_captions(folders[client]) < 3:
                    assert running[client].poll() is None, running[client].communicate()
                    assert time.monotonic() < deadline, f"{client}: no captions after 60 s"
                    time.sleep(0.02)
            assert all(process.poll() is None for process in running.values())
            doomed.send(signal.SIGKILL)
            doomed.wait(10)
            outputs = {client: process.communicate(timeout=90) for client, process in running.items()}
        finally:
            for process in running.values():
                if process.poll() is None:
                    process.kill()
                    process.wait(10)

    existing: dict[str, dict[Path, int]] = {}
    for client in CLIENTS:
        assert running[client].returncode != 0, outputs[client]
        assert b"server unreachable; waiting up to 2 s for it to come back" in outputs[client][1]
        captions = {caption_of(image): image for image in images[client] if caption_of(image).exists()}
        assert 3 <= len(captions) < 40, client
        for path, image in captions.items():
            assert path.read_text(encoding="utf-8") == expected[image], path  # complete, real captions
        assert temp_files(folders[client]) == []
        assert set(folders[client].iterdir()) == set(images[client]) | set(captions)
        existing[client] = {path: path.stat().st_mtime_ns for path in captions}
    assert list(scratch.iterdir()) == []

    # A re-run against a healthy server captions only what is missing, and leaves the rest alone.
    for client in CLIENTS:
        again = run_client(client, server, folders[client], tmpdir=scratch)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.counts(client) == (40 - len(existing[client]), len(existing[client]), 0)
        for image in images[client]:
            assert caption_of(image).read_text(encoding="utf-8") == expected[image], image
        assert {path: path.stat().st_mtime_ns for path in existing[client]} == existing[client]
        assert temp_files(folders[client]) == []
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# A pool behind a real HAProxy whose only live server restarts

HAPROXY = shutil.which("haproxy")


def haproxy_config(front: int, backends: list[str]) -> str:
    """``service/haproxy.cfg`` unprivileged and local, with fast health checks (as test_haproxy)."""
    text = (paths.SERVICE / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^\s*(user|group|daemon|stats socket|log /dev/log).*\n", "", text)
    text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>127.0.0.1:{front}", text)
    text = re.sub(r"\binter \S+", "inter 100ms", text)
    servers = iter(backends)
    return re.sub(r"(?m)^(\s*server \S+ )\S+", lambda m: m.group(1) + next(servers), text)


def proxy_answer(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)")
def test_pool_behind_haproxy_outlives_its_servers_restart(tmp_path: Path) -> None:
    """Both folder clients through the shipped HAProxy config; its one live server is killed and
    comes back seconds later. Meanwhile HAProxy answers 502/503 itself (no Retry-After): the runs
    pause instead of failing image after image, and every image ends captioned."""
    settings: dict[str, Any] = {"port": free_port(), "max_batch_size": 2}
    never_up = f"127.0.0.1:{free_port()}"  # the pool's second member is down all along
    front = free_port()
    proxy_url = f"http://127.0.0.1:{front}"
    folders = {client: tmp_path / client for client in CLIENTS}
    images = {
        client: [save_image(folders[client] / f"img{i:02d}.png", i) for i in range(12)] for client in CLIENTS
    }
    running: dict[str, subprocess.Popen[bytes]] = {}
    proxy: subprocess.Popen[bytes] | None = None
    try:
        with ServerProcess.fake(tmp_path, "first", delay=0.3, **settings) as first:
            backend = first.wait_listening().split("//")[1]
            config = tmp_path / "haproxy.cfg"
            config.write_text(haproxy_config(front, [backend, never_up]))
            assert HAPROXY is not None
            with (tmp_path / "haproxy.log").open("wb") as log:
                proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=log)
            deadline = time.monotonic() + 15
            while proxy_answer_or_none(proxy_url + "/ready") != 200:
                assert proxy.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "haproxy.log"
                ).read_text()
                time.sleep(0.1)
            for client in CLIENTS:
                command = client_command(client, proxy_url, folders[client], parallel=2)
                at = -3 if client == "bash" else 1  # python: an option of the group, before "folder"
                command[at:at] = ["--retries", "1"]
                running[client] = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env()
                )
            deadline = time.monotonic() + 60
            while min(count_captions(folder) for folder in folders.values()) < 2:
                assert all(p.poll() is None for p in running.values()), "a run ended before the restart"
                assert time.monotonic() < deadline, "no captions after 60 s"
                time.sleep(0.02)
            first.process.kill()  # requests are in flight through the proxy
            first.wait(10)
        time.sleep(1)
        status, headers, body = proxy_answer(proxy_url + "/health")
        assert (status, "Retry-After" in headers) == (503, False), body  # HAProxy's own answer
        time.sleep(2)
        with ServerProcess.fake(tmp_path, "second", delay=0.3, **settings) as second:
            second.wait_listening()
            outputs = {client: process.communicate(timeout=120) for client, process in running.items()}
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
    for client in CLIENTS:
        stderr = outputs[client][1].decode(errors="replace")
        assert running[client].returncode == 0, stderr[-3000:]
        assert "waiting up to 300 s for it to come back" in stderr and "server back; going on" in stderr
        assert all(caption_of(image).read_text(encoding="utf-8") for image in images[client]), client
        assert temp_files(folders[client]) == []


def proxy_answer_or_none(url: str) -> int | None:
    with contextlib.suppress(OSError):
        return proxy_answer(url)[0]
    return None
