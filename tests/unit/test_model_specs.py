"""Several models in one server, as configured: the ``--model [NAME=]SOURCE[+ADAPTER]`` grammar,
``--default-model``, per-model ``--idle-timeout NAME:SECONDS``, ``--revision NAME:REV`` and
``--backend NAME:BACKEND``, and ``--memory-budget`` sizes, from flags, the config file and the
environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vision_server.byte_sizes import format_byte_size, parse_byte_size
from vision_server.model_specs import (
    ModelSpec,
    build_specs,
    parse_idle_timeouts,
    parse_model_spec,
    parse_named_values,
    public_labels,
    public_model_id,
    public_source,
    without_local_path,
)
from vision_server.settings import Settings, SettingsError, load_settings

PROMPTGEN = "MiaoshouAI/Florence-2-large-PromptGen-v2.0"


# --- one spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PROMPTGEN, ModelSpec(PROMPTGEN, PROMPTGEN, named=False)),  # a bare source is named after itself
        ("test:tiny", ModelSpec("test:tiny", "test:tiny", named=False)),
        ("base=test:tiny", ModelSpec("base", "test:tiny")),
        ("my.model_2-x=org/repo", ModelSpec("my.model_2-x", "org/repo")),
        (
            f"mystyle={PROMPTGEN}+./adapters/mystyle",
            ModelSpec("mystyle", PROMPTGEN, "./adapters/mystyle"),
        ),
        ("test:tiny+/no/such/adapter", ModelSpec("test:tiny", "test:tiny", "/no/such/adapter", named=False)),
        # Paths whose text before '=' holds a separator or a colon are sources, never names (the
        # served name of a bare path is its folder's, see folder_names).
        ("./runs/lr=1e-4/model", ModelSpec("./runs/lr=1e-4/model", "./runs/lr=1e-4/model", named=False)),
        ("C:\\models\\a=b", ModelSpec("C:\\models\\a=b", "C:\\models\\a=b", named=False)),
        ("C:\\models\\florence", ModelSpec("C:\\models\\florence", "C:\\models\\florence", named=False)),
        ("win=C:\\models\\florence", ModelSpec("win", "C:\\models\\florence")),
        ("  spaced = test:tiny ", None),  # a name with a space is refused (see below)
    ],
)
def test_the_grammar(text: str, expected: ModelSpec | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="is not a model name"):
            parse_model_spec(text)
    else:
        assert parse_model_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("=test:tiny", "'' is not a model name"),
        ("-x=test:tiny", "'-x' is not a model name"),
        ("my model=test:tiny", "'my model' is not a model name"),
        ("a=", "give the model's source"),
        ("a=+/adapter", "nothing before '\\+'"),
        ("a=test:tiny+", "nothing after '\\+'"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_spec(text)


def test_a_plus_inside_an_existing_path_is_part_of_the_path(tmp_path: Path) -> None:
    model = tmp_path / "florence+lora-merged"
    model.mkdir()
    assert parse_model_spec(f"m={model}") == ModelSpec("m", str(model))
    adapter = tmp_path / "style"
    adapter.mkdir()
    assert parse_model_spec(f"m={model}+{adapter}") == ModelSpec("m", str(model), str(adapter))


def test_the_adapter_side_may_hold_a_plus_when_that_path_exists(tmp_path: Path) -> None:
    adapter = tmp_path / "style+v2"
    adapter.mkdir()
    # The last '+' would give the adapter "v2"; the existing directory "...style+v2" wins.
    assert parse_model_spec(f"m=test:tiny+{adapter}") == ModelSpec("m", "test:tiny", str(adapter))
    # Nothing exists: the last '+' splits (hub ids and test: sources hold no '+').
    assert parse_model_spec("m=org/repo+./not+here") == ModelSpec("m", "org/repo+./not", "here")


def test_specs_describe_themselves_for_the_log() -> None:
    assert ModelSpec("test:tiny", "test:tiny").describe() == "test:tiny"
    assert ModelSpec("test:tiny", "test:tiny", "/ad").describe() == "test:tiny + /ad"
    assert ModelSpec("s", "org/m", "/ad").describe() == "s (org/m + /ad)"


def test_the_start_line_shows_each_models_revision_and_backend_when_set() -> None:
    from vision_server.server import served_models

    assert served_models(Settings(model="test:tiny")) == "test:tiny"  # type: ignore[arg-type]  # the str shorthand under test: __post_init__ makes it a tuple; as short as before
    pinned = Settings(model=("org/m",), revision="v2", backend="blip")
    assert served_models(pinned) == "org/m @ v2 (backend blip)"
    settings = Settings(
        model=("a=test:tiny", "b=org/blip+/ad", "c=org/git"),
        model_revisions=(("b", "refs/pr/3"),),
        model_backends=(("b", "blip"), ("c", "git")),
        model_idle_timeouts=(("a", 60.0),),
    )
    assert served_models(settings) == (
        "a (test:tiny) [idle timeout 60s] [default], b (org/blip @ refs/pr/3 + /ad, backend blip), "
        "c (org/git, backend git)"
    )


# --- --idle-timeout entries ------------------------------------------------------------------


def test_idle_timeout_entries() -> None:
    assert parse_idle_timeouts(["60", "big:600", "small:0", "test:tiny:-1"]) == (
        60.0,
        {"big": 600.0, "small": 0.0, "test:tiny": -1.0},
    )
    assert parse_idle_timeouts([30]) == (30.0, {})
    assert parse_idle_timeouts(["a:5"]) == (None, {"a": 5.0})
    cases: list[tuple[list[Any], str]] = [
        (["soon"], "is not SECONDS or NAME:SECONDS"),
        (["a:soon"], "is not SECONDS or NAME:SECONDS"),
        ([":5"], "names no model"),
        (["5", "6"], "two server-wide values"),
        (["a:5", "a:6"], "a is given twice"),
        ([True], "not a number"),
    ]
    for entries, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_idle_timeouts(entries)


# --- --revision and --backend entries --------------------------------------------------------


def test_revision_and_backend_entries() -> None:
    assert parse_named_values("revision", ["main", "big:refs/pr/1", "test:tiny:abc123", " b : v2 "]) == (
        "main",
        {"big": "refs/pr/1", "test:tiny": "abc123", "b": "v2"},
    )
    assert parse_named_values("backend", ["blip"]) == ("blip", {})
    assert parse_named_values("revision", [1234567]) == ("1234567", {})  # a TOML number: a commit
    cases: list[tuple[list[Any], str]] = [
        ([":main"], "names no model before ':'"),
        (["a:"], "'a:' gives no value \\(REVISION or NAME:REVISION\\)"),
        (["main", "dev"], "two server-wide values \\(main and dev\\)"),
        (["a:x", "a:y"], "a is given twice"),
        ([True], "is not REVISION or NAME:REVISION"),
        ([1.5], "is not REVISION or NAME:REVISION"),
    ]
    for entries, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_named_values("revision", entries)


def test_each_model_gets_its_own_revision_and_backend_or_the_server_wide_one(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'model = ["a=test:tiny", "b=./blip", "c=org/repo"]\n'
        'revision = ["v1", "c:refs/pr/3"]\n'
        'backend = ["c:git", "b:blip"]\n'
    )
    s = load_settings(
        {"backend": ("a:florence2",), "revision": ("b:abc123",)},
        environ={"VISION_SERVER_BACKEND": "blip,c:auto"},
        config_path=config,
    )
    assert [(spec.name, spec.revision, spec.backend) for spec in s.model_specs] == [
        ("a", "v1", "florence2"),
        ("b", "abc123", "blip"),
        ("c", "refs/pr/3", "auto"),  # the environment replaced the config file's c:git
    ]
    assert (s.revision, s.backend) == ("v1", "blip")  # the server-wide values
    plain = Settings(model=("a=test:tiny", "b=./x"), revision="main", backend="git")
    assert {(spec.revision, spec.backend) for spec in plain.model_specs} == {("main", "git")}
    # a new model list drops the per-model values that named the old models
    replaced = load_settings({"model": ("z=test:tiny",)}, environ={}, config_path=config)
    assert [(spec.revision, spec.backend) for spec in replaced.model_specs] == [("v1", "auto")]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"backend": ("nobody:blip",)}, "backend: no model is named 'nobody'; the models are 'a', 'b'"),
        ({"revision": ("nobody:main",)}, "revision: no model is named 'nobody'; the models are 'a', 'b'"),
        ({"backend": ("a:llava",)}, "backend for a must be one of auto, florence2, blip"),
        ({"backend": ("llava",)}, "backend must be one of auto, florence2, blip.*not 'llava'"),
        ({"backend": ("blip", "git")}, "backend: two server-wide values"),
        ({"revision": ("a:",)}, "revision: 'a:' gives no value"),
    ],
)
def test_bad_revisions_and_backends_name_the_setting(
    tmp_path: Path, flags: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({"model": ("a=test:tiny", "b=./x"), **flags}, environ={}, config_path=_empty(tmp_path))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "a:b:c",
            "revision: 'a:b:c' is not REVISION or NAME:REVISION: for model 'a' it would be 'b:c', "
            "and a revision (branch, tag, commit or refs/pr/N) never holds ':'",
        ),
        (
            "test:tiny:v1:v2",
            "revision: 'test:tiny:v1:v2' is not REVISION or NAME:REVISION: for model 'test:tiny' it "
            "would be 'v1:v2', and a revision (branch, tag, commit or refs/pr/N) never holds ':'",
        ),
        (
            "x:y:z",
            "revision: 'x:y:z' is not REVISION or NAME:REVISION: NAME ends at the last ':', and no "
            "model is named 'x:y'; the models are 'a', 'test:tiny'",
        ),
    ],
)
@pytest.mark.parametrize("place", ["flag", "environment", "config"])
def test_a_revision_entry_with_a_colon_in_its_value_is_refused(
    tmp_path: Path, entry: str, expected: str, place: str
) -> None:
    """No branch, tag or commit holds ':', so ``a:b:c`` is a mistake, never model a at ``b:c``;
    reading it at the first ':' instead would break names that hold one (``test:tiny:main``)."""
    config = tmp_path / "config.toml"
    models = 'model = ["a=test:tiny", "test:tiny"]\n'
    config.write_text(models + (f'revision = ["{entry}"]\n' if place == "config" else ""))
    flags: dict[str, object] = {"revision": (entry,)} if place == "flag" else {}
    environ = {"VISION_SERVER_REVISION": entry} if place == "environment" else {}
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=config)
    where = {"flag": "--revision", "environment": "VISION_SERVER_REVISION", "config": f"revision in {config}"}
    assert str(refusal.value) == f"{expected} (set by {where[place]})"
    # the name with a colon still takes its own revision
    config.write_text(models)
    specs = load_settings({"revision": ("test:tiny:v1",)}, environ={}, config_path=config).model_specs
    assert [(spec.name, spec.revision) for spec in specs] == [("a", None), ("test:tiny", "v1")]


def test_an_idle_timeout_or_backend_entry_with_a_colon_in_its_value_is_refused(tmp_path: Path) -> None:
    for flags, expected in (
        (
            {"idle_timeout": ("a:b:5",)},
            "idle_timeout: 'a:b:5' is not SECONDS or NAME:SECONDS: for model 'a' it would be 'b:5'",
        ),
        (
            {"backend": ("a::blip",)},
            "backend: 'a::blip' is not BACKEND or NAME:BACKEND: for model 'a' it would be ':blip'",
        ),
    ):
        with pytest.raises(SettingsError) as refusal:
            load_settings({"model": ("a=test:tiny",), **flags}, environ={}, config_path=_empty(tmp_path))
        assert str(refusal.value).startswith(expected)


# --- adapters checked at start ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "environ", "source"),
    [
        ({"model": ("test:tiny",), "adapter": "gone"}, {}, "--adapter"),
        ({}, {"VISION_SERVER_MODEL": "styled=test:tiny+gone"}, "VISION_SERVER_MODEL"),
    ],
)
def test_a_missing_adapter_says_where_it_was_set(
    tmp_path: Path, flags: dict[str, object], environ: dict[str, str], source: str
) -> None:
    """``--adapter DIR`` or ``--model NAME=SOURCE+DIR``: the start error names the one used."""
    from vision_server.runtime import build_models

    flags = {**flags, "adapter": str(tmp_path / "gone")} if "adapter" in flags else flags
    environ = {name: value.replace("+gone", f"+{tmp_path / 'gone'}") for name, value in environ.items()}
    settings = load_settings(flags, environ=environ, config_path=_empty(tmp_path))
    with pytest.raises(SettingsError) as refusal:
        build_models(settings)
    assert str(settings.located(refusal.value)).endswith(
        f"the adapter directory {tmp_path / 'gone'} does not exist (set by {source})"
    )


def test_a_folder_that_is_no_adapter_stops_the_start(tmp_path: Path) -> None:
    """The model loads on first use, so what would fail then is named at start; a stopped
    ``vision-server train`` run gets told how to finish it or which checkpoint to use."""
    from vision_server.runtime import adapter_problem, build_captioner

    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text("{}")
    for step in (14, 36):
        checkpoint = tmp_path / "stopped" / "checkpoints" / f"step-{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_config.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    ready = tmp_path / "stopped" / "checkpoints" / "step-00000036"
    assert adapter_problem(ready) is None
    assert (
        adapter_problem(tmp_path / "missing")
        == f"the adapter directory {tmp_path / 'missing'} does not exist"
    )
    assert f"{tmp_path / 'a-file'} is a file; name the folder" in str(adapter_problem(tmp_path / "a-file"))
    assert "has no adapter_config.json, so it is not a PEFT adapter" in str(
        adapter_problem(tmp_path / "empty")
    )
    assert "has no adapter_model.safetensors" in str(adapter_problem(tmp_path / "config-only"))
    settings = load_settings(
        {"model": (f"styled=test:tiny+{tmp_path / 'stopped'}",)}, environ={}, config_path=_empty(tmp_path)
    )
    with pytest.raises(SettingsError) as caught:
        build_captioner(settings)
    assert str(caught.value) == (
        f"model styled: {tmp_path / 'stopped'} is a training run that has not finished (no adapter yet): "
        f"finish it with vision-server train ... --resume {tmp_path / 'stopped'}, or use its newest "
        f"checkpoint {ready}"
    )


# --- memory sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GiB", 24 * 1024**3),
        ("8G", 8 * 1000**3),
        ("8gb", 8 * 1000**3),
        ("512MB", 512 * 1000**2),
        ("512mib", 512 * 1024**2),
        ("1.5GiB", 1536 * 1024**2),
        ("1.5 Gi", 1536 * 1024**2),
        ("1000000", 1_000_000),
        ("100B", 100),
        ("2T", 2 * 1000**4),
        ("1KiB", 1024),
        ("3k", 3000),
    ],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "8 GB RAM", "-1G", "1e9", "8X", "GiB", "1.2.3G"])
def test_garbage_memory_sizes_are_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="24GiB, 8G"):
        parse_byte_size(text)


def test_sizes_format_for_messages() -> None:
    assert [format_byte_size(n) for n in (512, 1536 * 1024**2, 3 * 1024**4)] == [
        "512 B",
        "1.5 GiB",
        "3.0 TiB",
    ]


# --- settings: several models ----------------------------------------------------------------


def test_several_models_the_first_is_the_default(tmp_path: Path) -> None:
    adapter = tmp_path / "style"
    adapter.mkdir()
    s = Settings(model=("base=test:tiny", f"styled=test:tiny+{adapter}", "other=./blip"))
    assert [spec.name for spec in s.model_specs] == ["base", "styled", "other"]
    assert s.model_specs[1] == ModelSpec("styled", "test:tiny", str(adapter))
    assert s.default_model_name == "base" and s.default_model_spec is s.model_specs[0]
    picked = Settings(model=("base=test:tiny", "other=./blip"), default_model="other")
    assert picked.default_model_name == "other" and picked.default_model_spec.source == "./blip"
    assert [spec.name for spec in picked.model_specs] == ["base", "other"]  # the order stays


def test_a_bare_model_keeps_its_old_name_and_adapter() -> None:
    s = Settings(model="test:tiny", adapter="/some/adapter")  # type: ignore[arg-type]  # the str shorthand under test: __post_init__ makes it a tuple; a plain string still works
    assert s.model_specs == (ModelSpec("test:tiny", "test:tiny", "/some/adapter", named=False),)
    assert s.default_model_name == "test:tiny"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": ("a=test:tiny", "a=./other")}, "the name 'a' is used twice"),
        ({"model": ("test:tiny", "test:tiny")}, "the name 'test:tiny' is used twice"),
        (
            {"model": ("a=test:tiny", "b=./x"), "default_model": "c"},
            "no model is named 'c'; the models are 'a', 'b'",
        ),
        (
            {"model": ("a=test:tiny",), "adapter": "/ad"},
            "write the adapter into the model.*NAME=SOURCE\\+ADAPTER",
        ),
        ({"model": ("test:tiny", "b=./x"), "adapter": "/ad"}, "a separate adapter goes with a single"),
        ({"model": ("test:tiny+/one",), "adapter": "/two"}, "already names an adapter"),
        ({"model": ()}, "at least one model"),
        (
            {"model": ("a=test:tiny",), "model_idle_timeouts": (("b", 5.0),)},
            "no model is named 'b'; the models are 'a'",
        ),
        (
            {"model": ("a=test:tiny",), "model_idle_timeouts": (("a", -2.0),)},
            "idle_timeout for a must be >= 0, or -1",
        ),
        ({"memory_budget": "lots"}, "memory_budget: 'lots' is not a size"),
        ({"memory_budget": "0GiB"}, "memory_budget must be more than 0"),
    ],
)
def test_bad_model_settings_are_settings_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**changes)  # type: ignore[arg-type]


def test_memory_budget_is_exposed_in_bytes() -> None:
    assert Settings(memory_budget="24GiB").memory_budget_bytes == 24 * 1024**3
    assert Settings(memory_budget="").memory_budget_bytes is None  # an empty variable unsets it
    assert Settings().memory_budget_bytes is None


# --- settings: from the config file, the environment and flags ------------------------------


def test_config_file_lists_models_and_mixes_idle_timeouts(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'model = ["base=test:tiny", "blip=./blip"]\n'
        'default-model = "blip"\n'
        'idle_timeout = [120, "blip:30", "base:-1"]\n'
        'memory_budget = "8GiB"\n'
    )
    s = load_settings(environ={}, config_path=config)
    assert [(spec.name, spec.source, spec.idle_timeout) for spec in s.model_specs] == [
        ("base", "test:tiny", -1.0),
        ("blip", "./blip", 30.0),
    ]
    assert (s.default_model_name, s.idle_timeout, s.memory_budget_bytes) == ("blip", 120.0, 8 * 1024**3)


def test_config_file_single_strings_and_plain_numbers(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model = "solo=test:tiny"\nidle_timeout = 45\nmemory_budget = 1000000\n')
    s = load_settings(environ={}, config_path=config)
    assert [spec.name for spec in s.model_specs] == ["solo"]
    assert (s.idle_timeout, s.memory_budget_bytes) == (45.0, 1_000_000)


def test_environment_separates_with_commas(tmp_path: Path) -> None:
    env = {
        "VISION_SERVER_MODEL": "a=test:tiny, b=./blip",
        "VISION_SERVER_IDLE_TIMEOUT": "90,b:10",
        "VISION_SERVER_DEFAULT_MODEL": "b",
        "VISION_SERVER_MEMORY_BUDGET": "512MB",
    }
    s = load_settings(environ=env, config_path=_empty(tmp_path))
    assert [(spec.name, spec.idle_timeout) for spec in s.model_specs] == [("a", None), ("b", 10.0)]
    assert (s.default_model_name, s.idle_timeout, s.memory_budget_bytes) == ("b", 90.0, 512_000_000)


def test_an_environment_list_that_starts_with_a_bracket_is_json(tmp_path: Path) -> None:
    """A comma inside a value (a local path) fits only the JSON form; every list setting takes it."""
    env = {
        "VISION_SERVER_MODEL": ' ["a=/models/florence,v2", "b=test:tiny"] ',
        "VISION_SERVER_IDLE_TIMEOUT": '[90, "b:10"]',
        "VISION_SERVER_REVISION": '["a:refs/pr/1"]',
        "VISION_SERVER_CORS_ORIGINS": '["https://a.example", "http://[::1]:8080"]',
    }
    s = load_settings(environ=env, config_path=_empty(tmp_path))
    assert [(spec.name, spec.source, spec.idle_timeout, spec.revision) for spec in s.model_specs] == [
        ("a", "/models/florence,v2", None, "refs/pr/1"),
        ("b", "test:tiny", 10.0, None),
    ]
    assert s.idle_timeout == 90.0
    assert s.cors_origins == ("https://a.example", "http://[::1]:8080")
    # Only list settings: a single value that starts with '[' stays text.
    plain = load_settings(environ={"VISION_SERVER_ADAPTER": "[not json"}, config_path=_empty(tmp_path))
    assert plain.adapter == "[not json"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["a=test:tiny", ', "^model: a variable's value that starts with '\\[' is read as a JSON list"),
        ("[a=test:tiny]", "not valid JSON \\(Expecting value at character 2\\)"),
        ('["a=test:tiny", ["nested"]]', 'may hold only strings and numbers, not \\["nested"\\]'),
        ('["a=test:tiny", null]', "may hold only strings and numbers, not null"),
    ],
)
def test_invalid_json_in_an_environment_list_says_where(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as refusal:
        load_settings(environ={"VISION_SERVER_MODEL": value}, config_path=_empty(tmp_path))
    assert str(refusal.value).count("VISION_SERVER_MODEL") == 1
    assert str(refusal.value).endswith(" (set by VISION_SERVER_MODEL)")


def test_later_sources_replace_idle_timeouts_value_by_value(tmp_path: Path) -> None:
    """A flag naming one model keeps the config's server-wide value and its other models' values."""
    config = tmp_path / "config.toml"
    config.write_text('model = ["a=test:tiny", "b=./x"]\nidle_timeout = [600, "a:60", "b:5"]\n')
    s = load_settings(
        {"idle_timeout": ("a:30",)}, environ={"VISION_SERVER_IDLE_TIMEOUT": "b:7"}, config_path=config
    )
    assert s.idle_timeout == 600.0
    assert [(spec.name, spec.idle_timeout) for spec in s.model_specs] == [("a", 30.0), ("b", 7.0)]
    wide = load_settings({"idle_timeout": ("0",)}, environ={}, config_path=config)
    assert wide.idle_timeout == 0.0 and wide.model_specs[0].idle_timeout == 60.0


def test_flags_replace_the_configured_models_and_what_named_them(tmp_path: Path) -> None:
    """A later model list drops the earlier default and per-model timeouts (they named models that
    are gone) but keeps the server-wide timeout; names given beside the new list still count."""
    config = tmp_path / "config.toml"
    config.write_text('model = ["a=test:tiny", "b=./x"]\ndefault_model = "b"\nidle_timeout = [50, "b:5"]\n')
    s = load_settings({"model": ("c=test:tiny",)}, environ={}, config_path=config)
    assert [(spec.name, spec.idle_timeout) for spec in s.model_specs] == [("c", None)]
    assert (s.default_model_name, s.idle_timeout) == ("c", 50.0)
    env = {"VISION_SERVER_MODEL": "c=test:tiny,d=./y", "VISION_SERVER_IDLE_TIMEOUT": "d:9"}
    s = load_settings({"default_model": "d"}, environ=env, config_path=config)
    assert [(spec.name, spec.idle_timeout) for spec in s.model_specs] == [("c", None), ("d", 9.0)]
    assert s.default_model_name == "d"
    with pytest.raises(SettingsError, match="no model is named 'b'"):  # the same layer's names are checked
        load_settings({"model": ("c=test:tiny",), "idle_timeout": ("b:1",)}, environ={}, config_path=config)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"idle_timeout": ("soon",)}, "'soon' is not SECONDS or NAME:SECONDS"),
        ({"idle_timeout": ("nobody:5",)}, "no model is named 'nobody'"),
        ({"idle_timeout": ("-5",)}, "idle_timeout must be >= 0"),
        ({"model": ("bad name=test:tiny",)}, "'bad name' is not a model name"),
    ],
)
def test_bad_flags_are_settings_errors(tmp_path: Path, flags: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ={}, config_path=_empty(tmp_path))


def test_the_per_model_field_is_not_a_user_setting(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    for internal in ("model_idle_timeouts", "model_backends", "model_revisions"):
        config.write_text(f'{internal} = [["a", "1"]]\n')
        with pytest.raises(SettingsError, match=f"unknown setting '{internal}'"):
            load_settings(environ={}, config_path=config)


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


# --- a local directory without NAME= is served under its folder's name -------------------------


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (["/home/me/models/promptgen"], ["promptgen"]),
        (["~/models/x", "C:\\Users\\me\\models\\y", "./runs/lr=1e-4/model"], ["x", "y", "model"]),
        (["/runs/a/final", "/runs/b/final", "test:tiny"], ["a/final", "b/final", "test:tiny"]),
        (["/home/me/fast", "fast=test:tiny"], ["me/fast", "fast"]),  # never another model's name
        (["/srv/org/x", "org/x"], ["x", "org/x"]),  # a hub id keeps its name
        (["a=./m", "/srv/m"], ["a", "m"]),  # a NAME= keeps its name whatever its source
    ],
)
def test_an_unnamed_local_directory_is_named_after_its_folder(models: list[str], expected: list[str]) -> None:
    assert [spec.name for spec in build_specs(models)] == expected


def test_a_folder_name_that_every_ending_of_its_path_clashes_with_is_refused() -> None:
    with pytest.raises(ValueError) as refusal:
        build_specs(["/x", "x=test:tiny"])
    assert str(refusal.value) == (
        "model: '/x', given without NAME=, is served under its folder's name, but every ending of "
        "its path names another model; give it a name: NAME=/x"
    )


def test_a_folder_named_by_dots_is_named_after_the_folder_they_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here" / "deeper")
    assert [spec.name for spec in build_specs(["./", ".."])] == ["deeper", "here"]


def test_the_path_of_a_folder_named_model_still_names_it_in_every_setting(tmp_path: Path) -> None:
    """Before folder names the path was the served name; configs that use it keep working."""
    config = tmp_path / "config.toml"
    config.write_text(
        'model = ["/srv/models/florence", "b=test:tiny"]\ndefault-model = "/srv/models/florence"\n'
        'idle-timeout = ["/srv/models/florence:60", "b:5"]\nrevision = ["/srv/models/florence:v2"]\n'
        'backend = ["florence:florence2"]\n'
    )
    s = load_settings(environ={}, config_path=config)
    assert [(m.name, m.source, m.idle_timeout, m.revision, m.backend) for m in s.model_specs] == [
        ("florence", "/srv/models/florence", 60.0, "v2", "florence2"),
        ("b", "test:tiny", 5.0, None, "auto"),
    ]
    assert s.default_model_name == "florence" and s.default_model_spec.source == "/srv/models/florence"
    config.write_text(
        'model = ["/srv/models/florence"]\nidle-timeout = ["florence:60", "/srv/models/florence:5"]\n'
    )
    with pytest.raises(
        SettingsError, match=r"idle_timeout: florence is given twice \('/srv/models/florence' is its path\)"
    ):
        load_settings(environ={}, config_path=config)


# --- how served names show where anyone may read them (/metrics, /health) ----------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([PROMPTGEN, "test:tiny", "fast", "models/x"], [PROMPTGEN, "test:tiny", "fast", "models/x"]),
        (["/home/me/models/promptgen"], ["promptgen"]),
        (["~/models/x", "C:\\Users\\me\\models\\y", "./runs/lr=1e-4/model"], ["x", "y", "model"]),
        (["/home/me/models/x", "/srv/x"], ["models/x", "srv/x"]),  # as few folders as tell them apart
        (["/home/me/fast", "fast"], ["me/fast", "fast"]),  # never the same as another model's name
        (["/home/me/models/x", "models/x"], ["x", "models/x"]),
    ],
)
def test_public_labels_show_no_local_paths(names: list[str], expected: list[str]) -> None:
    labels = public_labels(names)
    assert [labels[name] for name in names] == expected
    assert len(set(labels.values())) == len(names)


@pytest.mark.parametrize(
    ("source", "name", "shown_source", "shown_id"),
    [
        (PROMPTGEN, PROMPTGEN, PROMPTGEN, PROMPTGEN),  # a hub id is what clients already know
        (PROMPTGEN, "large", PROMPTGEN, PROMPTGEN),
        ("test:tiny", "test:tiny", "test:tiny", "test:tiny"),
        ("/home/me/models/florence", "florence", "local", "florence"),
        ("~/models/x", "fast", "local", "fast"),
        ("C:\\Users\\me\\models\\y", "y", "local", "y"),
        ("./runs/lr=1e-4/model", "model", "local", "model"),
    ],
)
def test_clients_see_a_local_directory_as_local_and_by_its_served_name(
    source: str, name: str, shown_source: str, shown_id: str
) -> None:
    assert (public_source(source), public_model_id(source, name)) == (shown_source, shown_id)


@pytest.mark.parametrize(
    ("source", "text", "shown"),
    [
        ("/srv/m/flo", "/srv/m/flo: no config.json in /srv/m/flo", "flo: no config.json in flo"),
        ("./m/flo", "cannot read ./m/flo.", "cannot read flo."),
        ("org/name", "org/name: gated", "org/name: gated"),  # a hub id is no path
        ("test:tiny", "test:tiny failed.", "test:tiny failed."),
    ],
)
def test_without_local_path_names_the_model(source: str, text: str, shown: str) -> None:
    assert without_local_path(text, source, "flo") == shown


def test_without_local_path_finds_the_expanded_and_absolute_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    text = f"bad weights in {tmp_path / 'm' / 'flo'}/model.safetensors"
    assert without_local_path(text, "~/m/flo", "flo") == "bad weights in flo/model.safetensors"
    assert without_local_path(text, "./m/flo", "flo") == "bad weights in flo/model.safetensors"
    assert without_local_path("a sentence. With dots.", ".", "here") == "a sentence. With dots."
