"""The generic backends from the command line: ``make-test-model --family`` and ``caption``, as processes."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from tests.support.bulk_data import caption_command, cli_env
from tests.support.generic_reference import reference_caption
from tests.support.images import encode, noise
from tests.support.processes import cli_command
from vision_server.cli import main
from vision_server.testing.tiny_generic import SIDE


def test_make_test_model_then_caption_a_folder_with_it(tmp_path: Path) -> None:
    """An Idefics3 (the chat VLM) built by ``make-test-model --family`` captions a folder with
    ``vision-server caption`` in a real process; each caption file is the direct transformers
    answer for its image. (The build runs in-process: a second interpreter start costs more than
    the whole build, and the refusal test below runs the command as a process.)"""
    model = tmp_path / "vlm"
    env = cli_env(tmp_path)
    built = CliRunner().invoke(main, ["make-test-model", "--family", "idefics3", str(model)])
    assert built.exit_code == 0, built.output
    assert built.output.strip() == str(model)
    assert json.loads((model / "config.json").read_text())["architectures"] == [
        "Idefics3ForConditionalGeneration"
    ]

    images = tmp_path / "images"
    images.mkdir()
    for seed in (1, 2):
        (images / f"p{seed}.png").write_bytes(encode(noise(seed, (SIDE, SIDE))))
    options = ("--max-new-tokens", "6", "--num-beams", "1")
    command = caption_command(images, "--model", model, *options, "--cache-dir", tmp_path / "cache")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for seed in (1, 2):
        expected = reference_caption(
            model, "idefics3", noise(seed, (SIDE, SIDE)), max_new_tokens=6, num_beams=1
        )
        assert expected and (images / f"p{seed}.txt").read_text(encoding="utf-8") == expected


def test_make_test_model_refuses_florence_only_options_for_other_families(tmp_path: Path) -> None:
    command = [*cli_command(), "make-test-model", "--family", "blip", "--preset", "base", str(tmp_path / "m")]
    result = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "florence2 only" in result.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", ["blip", "git", "vision-encoder-decoder"])
def test_caption_runs_every_other_generic_family(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``vision-server caption`` with a BLIP, GIT or ViT+GPT-2 model (Idefics3 above): the caption
    file holds the direct transformers answer for the image."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "p.png").write_bytes(encode(noise(3, (SIDE, SIDE))))
    model = generic_model_dirs[family]
    options = ("--max-new-tokens", "6", "--num-beams", "1", "--cache-dir", tmp_path / "cache")
    command = caption_command(images, "--model", model, *options)
    result = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = reference_caption(model, family, noise(3, (SIDE, SIDE)), max_new_tokens=6, num_beams=1)
    assert expected and (images / "p.txt").read_text(encoding="utf-8") == expected


class ConfigOnlyHub(http.server.BaseHTTPRequestHandler):
    """A stand-in hub that knows one model's ``config.json`` (a GIT model) and nothing else, and
    writes down every request it gets."""

    asked: ClassVar[list[str]] = []
    CONFIG = "/someone/captioner/resolve/main/config.json"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        self.asked.append(f"{self.command} {self.path}")
        data = json.dumps({"model_type": "git", "architectures": ["GitForCausalLM"]}).encode()
        self.send_response(200 if self.path == self.CONFIG else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_auto_backend_run_asks_the_hub_for_config_json_once(tmp_path: Path) -> None:
    """An uncached hub id under ``--backend auto``: planning (the task list) and building the
    captioner decide by one config.json request (before, each asked the hub)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "p.png").write_bytes(encode(noise(4, (SIDE, SIDE))))
    ConfigOnlyHub.asked = []
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), ConfigOnlyHub) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        env = cli_env(tmp_path) | {
            "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
            "HF_HOME": str(tmp_path / "hf"),
        }
        command = caption_command(images, "--model", "someone/captioner", "--backend", "auto")
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        finally:
            hub.shutdown()
    # The stand-in has no weights: the run stops at the load, as a run whose model cannot load does.
    assert result.returncode == 1 and "the model could not be loaded" in result.stderr.lower(), result.stderr
    assert ConfigOnlyHub.asked.count(f"GET {ConfigOnlyHub.CONFIG}") == 1, ConfigOnlyHub.asked
