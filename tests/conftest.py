"""Session-wide test models: built once per run into temp dirs (about a second in all)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vision_server.testing.tiny_model import build_test_adapter, build_test_model


@pytest.fixture(scope="session")
def tiny_native_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Florence-2 in the native transformers 5 layout (seed 0)."""
    return build_test_model(tmp_path_factory.mktemp("tiny-native") / "model")


@pytest.fixture(scope="session")
def tiny_original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in PromptGen's original remote-code layout (model.safetensors, fp32)."""
    return build_test_model(tmp_path_factory.mktemp("tiny-original") / "model", fmt="original")


@pytest.fixture(scope="session")
def tiny_original_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original layout as microsoft/Florence-2 ships it: an fp16 pytorch_model.bin."""
    out = tmp_path_factory.mktemp("tiny-original-bin") / "model"
    return build_test_model(out, fmt="original", weights="bin")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (r=4, q_proj/v_proj, non-zero B) for the tiny model, native key names."""
    return build_test_adapter(tiny_native_dir, tmp_path_factory.mktemp("tiny-adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_original_adapter_dir(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same adapter with the key names of the original layout."""
    out = tmp_path_factory.mktemp("tiny-original-adapter") / "adapter"
    return build_test_adapter(tiny_native_dir, out, fmt="original")


@pytest.fixture(scope="module")
def tiny_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vision-server serve --model test:tiny`` as a real process on a free port, one per module.

    The model is preloaded (it is ready once the server listens) and captions are capped at 32
    tokens to keep modules fast; everything else is the server's default.
    """
    from tests.processes import ServerProcess, cli_command, server_env

    tmp = tmp_path_factory.mktemp("tiny-server")
    options = ["--idle-timeout", "-1", "--max-new-tokens", "32", "--preload"]
    command = [*cli_command(), "serve", "--model", "test:tiny", *options]
    with ServerProcess(command, server_env(tmp), tmp / "server.log") as process:
        yield process.wait_listening(timeout=90)
        process.send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
