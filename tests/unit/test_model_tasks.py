"""``runtime.model_tasks`` (the task list a bulk run plans with, without torch) says what the
captioner ``build_captioner`` makes would, and refuses what it refuses, for every backend choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vision_server.runtime import build_captioner, model_tasks
from vision_server.settings import Settings, SettingsError, load_settings
from vision_server.tasks import CAPTION_TASK, FLORENCE_TASKS, PROMPTGEN_TASKS


def _settings(tmp_path: Path, *flags: tuple[str, tuple[str, ...] | str]) -> Settings:
    config = tmp_path / "empty.toml"
    config.write_text("")
    return load_settings(dict(flags), environ={}, config_path=config)


def _model_folder(tmp_path: Path, name: str, config: dict[str, object]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("config", "backend", "expected"),
    [
        (None, "auto", PROMPTGEN_TASKS),  # test:tiny
        ({"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"]}, "auto", None),
        ({"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}, "auto", (CAPTION_TASK,)),
        ({"model_type": "git", "architectures": ["GitForCausalLM"]}, "auto", (CAPTION_TASK,)),
        ({"model_type": "something-else"}, "auto", (CAPTION_TASK,)),  # no backend runs it: its load says so
        ({"model_type": "blip"}, "florence2", None),
        ({"model_type": "florence2"}, "git", (CAPTION_TASK,)),
    ],
)
def test_the_planned_tasks_are_the_captioners(
    tmp_path: Path, config: dict[str, object] | None, backend: str, expected: tuple[str, ...] | None
) -> None:
    source = "test:tiny" if config is None else str(_model_folder(tmp_path, "m", config))
    settings = _settings(tmp_path, ("model", (source,)), ("backend", backend))
    spec = settings.default_model_spec
    planned = model_tasks(settings, spec)
    assert planned == build_captioner(settings, spec).tasks
    if expected is not None:
        assert planned == expected
    else:  # a local Florence-2 folder: its list depends on its name ("m": PromptGen's)
        assert planned in (PROMPTGEN_TASKS, FLORENCE_TASKS)


def test_an_adapter_on_a_model_that_takes_none_is_refused_as_the_captioner_refuses_it(tmp_path: Path) -> None:
    model = _model_folder(
        tmp_path, "blip", {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}
    )
    settings = _settings(tmp_path, ("model", (f"{model}+{_adapter(tmp_path)}",)))
    spec = settings.default_model_spec
    with pytest.raises(SettingsError) as planned:
        model_tasks(settings, spec)
    with pytest.raises(SettingsError) as built:
        build_captioner(settings, spec)
    assert str(planned.value) == str(built.value)
    assert "adapters work on Florence-2 models only" in str(planned.value)


def test_a_missing_adapter_is_refused_while_planning(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ("model", (f"test:tiny+{tmp_path / 'nowhere'}",)))
    with pytest.raises(SettingsError, match="does not exist"):
        model_tasks(settings, settings.default_model_spec)
