"""A model that can never load stops ``vision-server serve`` at start (exit status 2, the reason
on stderr), before it listens; a hub id is left for its first load, which may need the network."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.bulk_data import cli_env
from tests.support.processes import cli_command


def _serve(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [*cli_command(), "serve", "--port", "0", *args]
    return subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_a_missing_model_directory_stops_the_server_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = _serve(tmp_path, "--model", str(missing))
    assert result.returncode == 2, result.stderr
    assert f"Model directory {missing} does not exist" in result.stderr
    assert "listening on" not in result.stderr


def test_every_bad_model_of_several_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    result = _serve(
        tmp_path, "--model", "ok=test:tiny", "--model", f"file={a_file}", "--model", "nope=test:huge"
    )
    assert result.returncode == 2, result.stderr
    assert f"model file: Model path {a_file} is a file" in result.stderr
    assert "model nope: Unknown test model 'test:huge'" in result.stderr
    assert "model ok:" not in result.stderr
