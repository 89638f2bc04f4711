"""``vision-server train`` takes the settings it shares with serve (model, revision, device, cache
dir) from serve's config file and ``VISION_SERVER_*`` variables: flag > variable > config file >
default, and an error names where a value came from. Real processes on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import cli_command
from tests.support.train_data import captioned_folder

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("--max-steps", "1", "--log-with", "none", "--val-samples", "0")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return captioned_folder(tmp_path / "data")


def _env(tmp_path: Path, **variables: object) -> dict[str, str]:
    """No user config file (the default one is looked for under ``tmp_path``), no server
    variables but ``variables``, and no network: a default model would fail at once."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    env.update({f"VISION_SERVER_{name.upper()}": str(value) for name, value in variables.items()})
    return env


def _config(tmp_path: Path, text: str) -> Path:
    """``text`` as the user's own config file, where serve finds it without --config."""
    path = tmp_path / "xdg" / "vision-server" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _train(data: Path, output: Path, env: dict[str, str], *more: str) -> subprocess.CompletedProcess[str]:
    command = [*cli_command(), "train", "--dataset", str(data), "--output", str(output), *QUICK, *more]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _trained_with(output: Path) -> dict[str, object]:
    metadata = json.loads((output / "training.json").read_text())
    return {"model": metadata["base_model"], **{k: metadata["options"][k] for k in ("device", "cache_dir")}}


def test_serve_s_config_file_gives_train_its_model_cache_and_device(tmp_path: Path, data: Path) -> None:
    """What a user set up for serve (several models, the default one with an adapter on top, a
    cache dir, a device) trains the default model alone, from that cache, on that device."""
    cache, old_adapter = tmp_path / "serve-cache", tmp_path / "old-adapter"
    old_adapter.mkdir()
    _config(
        tmp_path,
        f'model = ["big=MiaoshouAI/Florence-2-large-PromptGen-v2.0", "tiny=test:tiny+{old_adapter}"]\n'
        f'default-model = "tiny"\ncache-dir = "{cache}"\ndevice = "cpu"\nport = 8123\n',
    )
    run = _train(data, tmp_path / "run", _env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert _trained_with(tmp_path / "run") == {"model": "test:tiny", "device": "cpu", "cache_dir": str(cache)}
    assert (cache / "test-models").is_dir()


def test_a_flag_beats_the_variable_which_beats_the_config_file(tmp_path: Path, data: Path) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    in_file, in_variable, in_flag = (
        tmp_path / "file-cache",
        tmp_path / "variable-cache",
        tmp_path / "flag-cache",
    )
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'model = "{not_a_model}"\ncache-dir = "{in_file}"\ndevice = "cpu"\n', encoding="utf-8")
    env = _env(tmp_path, model="test:tiny", cache_dir=in_variable)
    run = _train(data, tmp_path / "run", env, "--config", str(config), "--cache-dir", str(in_flag))
    assert run.returncode == 0, run.stderr
    assert _trained_with(tmp_path / "run") == {
        "model": "test:tiny",
        "device": "cpu",
        "cache_dir": str(in_flag),
    }
    assert (in_flag / "test-models").is_dir() and not in_variable.exists() and not in_file.exists()


def test_a_model_from_the_config_file_that_cannot_load_is_said_with_where_it_was_set(
    tmp_path: Path, data: Path
) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    config = _config(tmp_path, f'model = "{not_a_model}"\ndevice = "cpu"\n')
    run = _train(data, tmp_path / "run", _env(tmp_path, cache_dir=tmp_path / "cache"))
    assert run.returncode == 1, run.stderr
    assert f"Error: cannot load model '{not_a_model}': " in run.stderr
    assert f"(model set by model in {config}, device set by device in {config}, " in run.stderr
    assert "cache_dir set by VISION_SERVER_CACHE_DIR)" in run.stderr


def test_a_bad_shared_setting_is_a_usage_error_naming_its_source(tmp_path: Path, data: Path) -> None:
    config = _config(tmp_path, 'device = "gpu"\n')
    run = _train(data, tmp_path / "run", _env(tmp_path))
    assert run.returncode == 2, run.stderr
    assert f"device must be auto, cpu, cuda or cuda:N, not 'gpu' (set by device in {config})" in run.stderr
    run = _train(data, tmp_path / "run", _env(tmp_path, device="tpu"), "--config", str(config))
    assert "not 'tpu' (set by VISION_SERVER_DEVICE)" in run.stderr
    assert not (tmp_path / "run").exists()


def test_an_adapter_on_the_model_flag_is_refused(tmp_path: Path, data: Path) -> None:
    """train makes an adapter; one given on top of its --model would be silently dropped."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    run = _train(data, tmp_path / "run", _env(tmp_path), "--model", f"test:tiny+{adapter}", "--device", "cpu")
    assert run.returncode == 2, run.stderr
    assert f"give the model alone (test:tiny), without +{adapter} (set by --model)" in run.stderr
