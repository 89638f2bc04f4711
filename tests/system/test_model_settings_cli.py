"""Configuring several models from the command line, as a user sees it: ``--help``, exit status 2
with a message for a bad model setup, and ``caption`` using the default model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.api import tiny_cache_dir
from tests.support.bulk_data import caption_command, cli_env
from tests.support.images import b64, encode, noise
from tests.support.processes import ServerProcess, cli_command, http_json, server_env


def _run(tmp_path: Path, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [*cli_command(), *map(str, args)]
    return subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_serve_help_explains_the_model_flags(tmp_path: Path) -> None:
    result = _run(tmp_path, "serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # click wraps the help text
    assert "--model [NAME=]SOURCE[+ADAPTER_DIR]" in text
    assert "Repeat as NAME=SOURCE to serve several models" in text
    assert "--default-model NAME" in text
    assert (
        "--idle-timeout SECONDS|NAME:SECONDS" in text
        and "NAME:SECONDS (repeatable) sets one model's own" in text
    )
    assert "--memory-budget SIZE" in text and "24GiB, 8G, 512MB" in text
    assert "--backend BACKEND|NAME:BACKEND" in text and "--revision REVISION|NAME:REVISION" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "a=test:tiny", "--model", "a=test:tiny"), "the name 'a' is used twice"),
        (("--model", "my model=test:tiny"), "'my model' is not a model name"),
        (("--model", "a=test:tiny", "--default-model", "b"), "no model is named 'b'; the models are 'a'"),
        (("--model", "a=test:tiny", "--idle-timeout", "b:5"), "no model is named 'b'"),
        (("--model", "a=test:tiny", "--adapter", "x"), "NAME=SOURCE+ADAPTER_DIR"),
        (("--memory-budget", "lots"), "'lots' is not a size"),
        (("--model", "a=test:tiny", "--backend", "b:blip"), "backend: no model is named 'b'"),
        (("--model", "a=test:tiny", "--revision", "b:v2"), "revision: no model is named 'b'"),
        (("--model", "a=test:tiny", "--backend", "a:llava"), "backend for a must be one of auto, florence2"),
    ],
    ids=[
        "duplicate", "bad-name", "unknown-default", "unknown-idle", "adapter-flag", "budget",
        "unknown-backend-name", "unknown-revision-name", "unknown-backend",
    ],
)  # fmt: skip
def test_a_bad_model_setup_exits_2_with_the_reason(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = _run(tmp_path, "serve", "--port", "0", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_an_environment_model_list_in_json_holds_a_comma_and_bad_json_exits_2(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_native_dir: Path
) -> None:
    with_comma = tmp_path / "tiny,native"
    with_comma.symlink_to(tiny_native_dir, target_is_directory=True)
    env = server_env(tmp_path, cache_dir=tiny_cache_dir(tmp_path_factory))
    env["VISION_SERVER_MODEL"] = json.dumps([f"c={with_comma}", "t=test:tiny"])
    with ServerProcess([*cli_command(), "serve"], env, tmp_path / "server.log") as server:
        status, body = http_json(f"{server.wait_listening()}/v1/status")
        assert status == 200 and isinstance(body, dict)
        assert [(m["name"], m["source"]) for m in body["models"]] == [
            ("c", "local"),  # a directory's path is never shown to clients
            ("t", "test:tiny"),
        ]
    env = cli_env(tmp_path)
    broken = subprocess.run(
        [*cli_command(), "serve", "--port", "0"],
        env={**env, "VISION_SERVER_MODEL": '["a=test:tiny", b=test:tiny]'},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode == 2, broken.stderr
    assert "model: a variable's value that starts with '[' is read as a JSON list" in broken.stderr
    assert "(set by VISION_SERVER_MODEL)" in broken.stderr
    assert "Expecting value at character 17" in broken.stderr


def test_an_adapter_on_a_generic_model_is_refused_at_start(
    tmp_path: Path, generic_model_dirs: dict[str, Path], tiny_adapter_dir: Path
) -> None:
    blip = generic_model_dirs["blip"]
    result = _run(tmp_path, "serve", "--port", "0", "--model", f"b={blip}+{tiny_adapter_dir}")
    assert result.returncode == 2, result.stderr
    assert "adapters work on Florence-2 models only" in result.stderr and "blip backend" in result.stderr
    missing = _run(tmp_path, "serve", "--port", "0", "--model", f"b={blip}+{tmp_path / 'nope'}")
    assert (
        missing.returncode == 2
        and "the adapter directory" in missing.stderr
        and "does not exist" in missing.stderr
    )


def test_caption_uses_the_default_model_and_says_so(tmp_path: Path, tiny_native_dir: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode(noise(1, (64, 64))))
    out = tmp_path / "captions.jsonl"
    models = (
        "--model",
        "first=./not-a-model",
        "--model",
        f"second={tiny_native_dir}",
        "--default-model",
        "second",
    )
    options = ("--jsonl", out, "--max-new-tokens", "4", "--num-beams", "1", "--cache-dir", tmp_path / "cache")
    result = subprocess.run(
        caption_command(images, *models, *options),
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "captioning with the default model second" in result.stderr and "not first" in result.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["model"] == "second" and row["caption"]  # the served name, as vision-client folder writes it


def test_serve_starts_with_named_models_and_lists_them(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_adapter_dir: Path
) -> None:
    """A real server with two names on one source (one with an adapter): the start line names
    them (with a model's own revision and backend), /v1/status shows each with its own idle
    timeout, the default and the budget."""
    command = [
        *cli_command(), "serve", "--cache-dir", str(tiny_cache_dir(tmp_path_factory)),
        "--model", "plain=test:tiny", "--model", f"styled=test:tiny+{tiny_adapter_dir}",
        "--default-model", "styled", "--idle-timeout", "-1", "--idle-timeout", "plain:120",
        "--memory-budget", "1.5GiB", "--revision", "plain:v2", "--backend", "styled:florence2",
    ]  # fmt: skip
    with ServerProcess(command, server_env(tmp_path), tmp_path / "server.log") as server:
        url = server.wait_listening()
        status, body = http_json(f"{url}/v1/status")
        assert status == 200 and isinstance(body, dict)
        assert body["memory_budget"] == 1536 * 1024**2
        shown = [
            (m["name"], m["adapter"], m["default"], m["idle_timeout"], m["state"]) for m in body["models"]
        ]
        assert shown == [
            ("plain", None, False, 120.0, "unloaded"),
            ("styled", tiny_adapter_dir.name, True, -1.0, "unloaded"),  # the full path: in the log
        ]
        assert (
            f"serving plain (test:tiny @ v2) [idle timeout 120s], styled (test:tiny + "
            f"{tiny_adapter_dir}, backend florence2) [default] within 1.5 GiB" in server.log_text()
        )


def test_serve_runs_each_model_on_its_own_backend(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, generic_model_dirs: dict[str, Path]
) -> None:
    """A server-wide ``--backend`` beside a ``NAME:BACKEND`` one: each model gets its own, as
    /v1/status shows before anything loads, and one captions on it."""
    git, blip = generic_model_dirs["git"], generic_model_dirs["blip"]
    command = [
        *cli_command(), "serve", "--cache-dir", str(tiny_cache_dir(tmp_path_factory)),
        "--model", f"g={git}", "--model", f"b={blip}", "--model", "t=test:tiny",
        "--backend", "git", "--backend", "b:blip", "--backend", "t:florence2", "--revision", "g:main",
        "--max-new-tokens", "4", "--num-beams", "1",
    ]  # fmt: skip
    with ServerProcess(command, server_env(tmp_path), tmp_path / "server.log") as server:
        url = server.wait_listening()
        status, body = http_json(f"{url}/v1/status")
        assert status == 200 and isinstance(body, dict)
        assert [(m["name"], m["family"]) for m in body["models"]] == [
            ("g", "git"),
            ("b", "blip"),
            ("t", "florence-2"),  # each but g would be "git" without its own value
        ]
        request = {"model": "b", "image": b64(1), "prompt": "<CAPTION>"}
        status, answer = http_json(f"{url}/process_image", request)
        assert status == 200 and isinstance(answer, dict), answer
