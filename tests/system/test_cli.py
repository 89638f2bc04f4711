"""The vision-server command as a real subprocess: make-test-model, convert, caption, serve."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.images import save
from tests.support.processes import ServerProcess, free_port

CLI = [sys.executable, "-m", "vision_server"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_make_test_model_is_deterministic_and_convert_round_trips(tmp_path: Path) -> None:
    native, again = tmp_path / "native", tmp_path / "again"
    assert run("make-test-model", str(native)).returncode == 0
    assert run("make-test-model", str(again)).returncode == 0
    assert digest(native) == digest(again)
    original = tmp_path / "original"
    made = run("make-test-model", str(original), "--format", "original")
    assert made.returncode == 0, made.stderr
    assert "auto_map" in (original / "config.json").read_text()
    converted = tmp_path / "converted"
    result = run("convert", str(original), str(converted))
    assert result.returncode == 0, result.stderr
    assert (converted / "config.json").is_file() and str(converted) in result.stdout

    image = save(tmp_path / "a.png", 1, (64, 48))
    captions = []
    for m in (native, converted):
        done = run(
            "caption", str(image), "--model", str(m), "--task", "CAPTION", "--cache-dir", str(tmp_path / "c")
        )
        assert done.returncode == 0, done.stderr
        captions.append(image.with_suffix(".txt").read_text(encoding="utf-8"))
        image.with_suffix(".txt").unlink()
    assert captions[0] == captions[1] and captions[0].strip()


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    results = [
        run("convert", str(tmp_path / "missing"), str(tmp_path / "out1")),
        run("convert", str(not_a_model), str(tmp_path / "out2")),
        run("make-test-model", str(tmp_path / "x"), "--preset", "huge"),
        run("serve", "--dtype", "float8"),
    ]
    for result in results:
        assert result.returncode != 0 and "Traceback" not in result.stderr and result.stderr.strip()
    assert "missing" in results[0].stderr and "empty" in results[1].stderr
    assert "dtype must be one of" in results[3].stderr


def test_an_unwritable_log_file_is_a_message_and_exit_2(tmp_path: Path) -> None:
    # A directory (or a read-only place, as under systemd's ProtectSystem=strict) as --log-file.
    result = run(
        "serve", "--model", "test:tiny", "--cache-dir", str(tmp_path / "c"), "--log-file", str(tmp_path)
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and f"log_file {tmp_path}: cannot write there" in result.stderr
    assert "(set by --log-file)" in result.stderr


def test_a_start_error_names_the_variable_that_set_the_value(tmp_path: Path) -> None:
    """A service sets its values in an environment file the operator may not think of: name it."""
    env = {**os.environ, "VISION_SERVER_GALLERY": str(tmp_path / "gone")}
    result = run("serve", "--model", "test:tiny", "--cache-dir", str(tmp_path / "c"), env=env)
    assert result.returncode == 2, result.stderr
    assert f"gallery {tmp_path / 'gone'} is not a folder (set by VISION_SERVER_GALLERY)" in result.stderr


def test_a_port_or_host_it_cannot_listen_on_names_where_it_was_set(tmp_path: Path) -> None:
    """A taken port is the port's fault, a name that does not resolve the host's: each says
    where that value was given, as a bad value caught earlier does."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        in_use = run("serve", "--model", "test:tiny", "--cache-dir", str(tmp_path / "c"), "--port", port)
    env = {**os.environ, "VISION_SERVER_HOST": "no such host!"}
    unknown = run("serve", "--model", "test:tiny", "--cache-dir", str(tmp_path / "c"), "--port", "0", env=env)
    for result in (in_use, unknown):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: " in in_use.stderr and "(set by --port)" in in_use.stderr
    assert "cannot listen on no such host!:0: " in unknown.stderr
    assert "(set by VISION_SERVER_HOST)" in unknown.stderr


def test_a_cache_dir_that_cannot_be_made_stops_the_start_naming_where_it_was_set(tmp_path: Path) -> None:
    """Before, serve started and every first load failed with a bare FileNotFoundError; caption
    said only that the model could not be loaded."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    env = {**os.environ, "VISION_SERVER_CACHE_DIR": str(a_file)}
    served = run("serve", "--model", "test:tiny", "--port", "0", env=env)
    image = save(tmp_path / "c.png", 3, (32, 32))
    captioned = run("caption", str(image), "--model", "test:tiny", "--cache-dir", str(a_file / "under"))
    for result in (served, captioned):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        f"cache_dir {a_file}: cannot be made (it is a file) (set by VISION_SERVER_CACHE_DIR)" in served.stderr
    )
    assert f"cache_dir {a_file / 'under'}: cannot be made (" in captioned.stderr
    assert "(set by --cache-dir)" in captioned.stderr and not image.with_suffix(".txt").exists()


def test_serving_a_network_without_an_api_key_warns(tmp_path: Path) -> None:
    """Binding beyond loopback with no key opens captioning and status to the network: say so."""
    logs = []
    open_to_pages: dict[str, Any] = {"cors_origins": "*"}  # every web page may call it, and read the answers
    keyed: dict[str, Any] = {"api_key": "k", **open_to_pages}
    for name, settings in (("open", open_to_pages), ("keyed", keyed)):
        with ServerProcess.fake(tmp_path, name, delay=0, host="0.0.0.0", **settings) as server:
            server.wait_listening()
            server.stop()
            logs.append(server.log_text())
    assert "no --api-key: anyone who can reach http://0.0.0.0:" in logs[0] and "may caption" in logs[0]
    assert "--cors-origin '*' and no --api-key: every web page" in logs[0]
    assert "no --api-key" not in logs[1]
    assert "DNS-rebinding" not in logs[0]  # a network service checks no Host without --allowed-host


def test_the_start_log_names_the_hosts_answered(tmp_path: Path) -> None:
    """With the DNS-rebinding check on, one start line lists the accepted names and the flag that
    adds one, so an operator learns of the check before a proxy's first 403."""
    allowed: dict[str, Any] = {"allowed_hosts": "vision.lan,.Example.com"}
    with ServerProcess.fake(tmp_path, "loopback", delay=0, **allowed) as server:
        server.wait_listening()
        server.stop()
        lines = [line for line in server.log_text().splitlines() if "DNS-rebinding check" in line]
    assert len(lines) == 1 and "INFO" in lines[0], lines
    names = "Host is one of: localhost, *.localhost, IP addresses, vision.lan, .example.com (DNS"
    assert names in lines[0] and "add --allowed-host NAME" in lines[0]


def test_offline_hub_id_names_the_model_and_the_fix(tmp_path: Path) -> None:
    image = save(tmp_path / "b.png", 2, (64, 48))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run(
        "caption", str(image), "--model", "someone/Florence-2-nowhere", "--cache-dir", str(tmp_path), env=env
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "someone/Florence-2-nowhere" in result.stderr and "--local-dir" in result.stderr
    # The command it names is one huggingface_hub installs (huggingface-cli is gone since its 1.0).
    command = re.search(r"run '(\S+) download someone/Florence-2-nowhere --local-dir DIR'", result.stderr)
    assert command and (Path(sys.executable).parent / command.group(1)).exists(), result.stderr


def test_serve_test_model_captions_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "VISION_SERVER_CACHE_DIR": str(tmp_path / "cache")}
    server = subprocess.Popen(
        [*CLI, "serve", "--model", "test:tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/model", timeout=2) as response:
                    assert json.loads(response.read()) == "test:tiny"
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.3)
        import base64

        body = json.dumps(
            {
                "image": base64.b64encode(save(tmp_path / "c.png", 3, (64, 48)).read_bytes()).decode(),
                "prompt": "<CAPTION>",
            }
        ).encode()
        request = urllib.request.Request(f"{url}/process_image", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["result"].strip()
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr


def test_serve_says_it_is_starting_before_importing_torch(tmp_path: Path) -> None:
    """The model libraries take seconds to import: a line says so before they do (``-X importtime``
    writes each import to the same stderr, in order), then the usual start line follows."""
    command = [sys.executable, "-X", "importtime", "-m", "vision_server", "serve", "--model", "test:tiny"]
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1"}
    env.update({"VISION_SERVER_HOST": "127.0.0.1", "VISION_SERVER_PORT": "0"})
    with ServerProcess([*command, "--cache-dir", str(tmp_path)], env, tmp_path / "server.log") as server:
        server.wait_listening(timeout=120)
        server.stop()
        lines = server.log_text().splitlines()
    starting = next(i for i, line in enumerate(lines) if "starting vision-server" in line)
    torch = next(i for i, line in enumerate(lines) if re.search(r"\|\s+torch$", line))
    serving = next(i for i, line in enumerate(lines) if "serving test:tiny" in line)
    assert starting < torch < serving, lines[starting]
    assert f"(pid {server.pid}), loading libraries" in lines[starting] and "INFO" in lines[starting]
