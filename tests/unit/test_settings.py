"""Settings precedence and validation: defaults < config file < environment < flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vision_server.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_design(tmp_path: Path) -> None:
    s = Settings()
    assert (s.host, s.port, s.idle_timeout, s.max_queue) == ("127.0.0.1", 54880, 300.0, 256)
    assert s.max_batch_size is None  # per device: see test_batch_size_default_depends_on_the_device
    assert (s.num_beams, s.max_new_tokens, s.max_request_bytes) == (3, 1024, 20 * 1024 * 1024)
    assert s.model == ("MiaoshouAI/Florence-2-large-PromptGen-v2.0",)
    assert s.default_model_name == "MiaoshouAI/Florence-2-large-PromptGen-v2.0"
    assert s.memory_budget_bytes is None


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('port = 1000\nidle-timeout = 10\nmodel = "from-file"\ncors_origins = ["http://a"]\n')
    env = {"VISION_SERVER_IDLE_TIMEOUT": "20", "VISION_SERVER_MODEL": "from-env"}
    s = load_settings({"model": "from-flag", "port": None}, environ=env, config_path=config)
    assert (s.port, s.idle_timeout, s.model, s.cors_origins) == (1000, 20.0, ("from-flag",), ("http://a",))


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("preload = true\n")
    assert load_settings(environ={"VISION_SERVER_CONFIG": str(config)}).preload is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"idle_timeout": -5}, "idle_timeout"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"device": "tpu"}, "device"),
        ({"ssl_cert": "/x.pem"}, "together"),
        ({"api_key": ""}, "api_key is empty"),
        ({"api_key": "  "}, "api_key is empty"),
        ({"admin_key": ""}, "admin_key is empty"),
        ({"api_key": "sekret\r"}, "api_key has spaces"),
        ({"rate_limit": -5}, "rate_limit must be"),
        ({"cors_origins": ("127.0.0.1:8000",)}, "cors_origins: '127.0.0.1:8000' is not an origin"),
        ({"cors_origins": ("http://st.local:8000/index.html",)}, "is not an origin"),
        ({"default_task": "DETAILED"}, "default_task 'DETAILED' is no task of any model"),
        ({"shutdown_grace": -1}, "shutdown_grace must be 0 or more, not -1"),
        ({"request_timeout": 0}, "request_timeout must be more than 0"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, flags: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ={}, config_path=_empty(tmp_path))


def test_log_level_and_format_in_any_case(tmp_path: Path) -> None:
    """``LOG_LEVEL=INFO`` is how Python's logging spells it; an env file written so must not stop
    the start (other choices, such as the dtype, stay exact)."""
    env = {"VISION_SERVER_LOG_LEVEL": "DEBUG", "VISION_SERVER_LOG_FORMAT": " Json "}
    s = load_settings(environ=env, config_path=_empty(tmp_path))
    assert (s.log_level, s.log_format) == ("debug", "json")
    assert (
        load_settings({"log_level": "Warning"}, environ={}, config_path=_empty(tmp_path)).log_level
        == "warning"
    )
    with pytest.raises(
        SettingsError, match="log_level must be one of debug, info, warning, error, not 'verbose'"
    ):
        load_settings({"log_level": "VERBOSE"}, environ={}, config_path=_empty(tmp_path))


@pytest.mark.parametrize(
    ("flags", "given", "missing"),
    [({"ssl_cert": "/c.pem"}, "ssl_cert", "ssl_key"), ({"ssl_key": "/k.pem"}, "ssl_key", "ssl_cert")],
)
def test_half_a_tls_pair_names_the_flags_and_the_missing_half(
    tmp_path: Path, flags: dict[str, object], given: str, missing: str
) -> None:
    """The missing half's three spellings are named, and the given half says where it was set."""
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ={}, config_path=_empty(tmp_path))
    flag, variable = f"--{missing.replace('_', '-')}", f"VISION_SERVER_{missing.upper()}"
    assert str(refusal.value) == (
        f"ssl_cert and ssl_key must be given together: {given} is set but {missing} is not; give "
        f"{missing} too, as {flag}, {variable} or a config-file key (set by --{given.replace('_', '-')})"
    )


def test_unknown_config_key_and_bad_env_value(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings(environ={}, config_path=config)
    with pytest.raises(SettingsError, match=r"max_queue: cannot use 'lots'.*set by VISION_SERVER_MAX_QUEUE"):
        load_settings(environ={"VISION_SERVER_MAX_QUEUE": "lots"}, config_path=_empty(tmp_path))


def test_an_empty_key_in_the_environment_stops_the_start(tmp_path: Path) -> None:
    # A template whose secret was missing writes VISION_SERVER_API_KEY= : that must not open the server.
    with pytest.raises(SettingsError, match="VISION_SERVER_API_KEY"):
        load_settings(environ={"VISION_SERVER_API_KEY": ""}, config_path=_empty(tmp_path))
    config = tmp_path / "keys.toml"
    config.write_text('admin-key = ""\n')
    with pytest.raises(SettingsError, match="admin_key is empty"):
        load_settings(environ={}, config_path=config)
    assert load_settings({"rate_limit": 0}, environ={}, config_path=_empty(tmp_path)).rate_limit == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [("port = 1.5", "port: .*whole number .set by port in "),
     ("max-queue = true", "max_queue: .*not true/false .set by max-queue in "),
     ("request-timeout = false", "request_timeout: .*not true/false .set by request-timeout in ")],
)  # fmt: skip
def test_config_numbers_are_not_silently_truncated(tmp_path: Path, line: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(line + "\n")
    with pytest.raises(SettingsError, match=message):
        load_settings(environ={}, config_path=config)
    config.write_text("port = 8080.0\n")
    assert load_settings(environ={}, config_path=config).port == 8080


@pytest.mark.parametrize(
    ("line", "environ", "flags", "expected"),
    [
        ("max-request-bytes = '50MiB'\n", {}, {}, 50 * 1024 * 1024),
        ("max-request-bytes = 5000\n", {}, {}, 5000),
        ("", {"VISION_SERVER_MAX_REQUEST_BYTES": "1.5MB"}, {}, 1_500_000),
        ("", {}, {"max_request_bytes": "100mib"}, 100 * 1024 * 1024),
        ("", {}, {"max_request_bytes": "123456"}, 123456),
    ],
)
def test_the_request_size_limit_takes_units(
    tmp_path: Path, line: str, environ: dict[str, str], flags: dict[str, str], expected: int
) -> None:
    """Every other size setting is written 512MB or 2GiB; counting 20 MiB out in bytes is a chore."""
    config = tmp_path / "config.toml"
    config.write_text(line)
    assert load_settings(flags, environ=environ, config_path=config).max_request_bytes == expected


def test_a_request_size_limit_that_is_no_size_names_the_forms(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"max_request_bytes: cannot use 'lots': 'lots' is not a size"):
        load_settings({"max_request_bytes": "lots"}, environ={}, config_path=_empty(tmp_path))
    with pytest.raises(SettingsError, match="max_request_bytes must be at least 1, not 0"):
        load_settings({"max_request_bytes": "0MiB"}, environ={}, config_path=_empty(tmp_path))


@pytest.mark.parametrize("layer", ["config", "environment", "flag"])
def test_a_bad_value_says_where_it_was_set(tmp_path: Path, layer: str) -> None:
    """A value from a service's environment file or a config file is hard to find without this."""
    config = tmp_path / "config.toml"
    config.write_text("max_queue = 0\n" if layer == "config" else "")
    environ = {"VISION_SERVER_MAX_QUEUE": "0"} if layer == "environment" else {}
    flags = {"max_queue": 0} if layer == "flag" else {}
    source = {
        "config": f"max_queue in {config}",
        "environment": "VISION_SERVER_MAX_QUEUE",
        "flag": "--max-queue",
    }
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=config)
    assert str(refusal.value) == f"max_queue must be at least 1, not 0 (set by {source[layer]})"


@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        (
            {"VISION_SERVER_PORT": "abc"},
            {},
            "port: cannot use 'abc': expected a whole number (set by VISION_SERVER_PORT)",
        ),
        (
            {"VISION_SERVER_RATE_LIMIT": "x"},
            {},
            "rate_limit: cannot use 'x': expected a number (set by VISION_SERVER_RATE_LIMIT)",
        ),
        ({}, {"preload": "maybe"}, "preload: cannot use 'maybe': expected true/false (set by --preload)"),
        ({"VISION_SERVER_IDLE_TIMEOUT": "300"}, {"idle_timeout": ("a:b",)}, "(set by --idle-timeout)"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_variable_or_flag(
    tmp_path: Path, environ: dict[str, str], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=_empty(tmp_path))
    assert str(refusal.value).endswith(message)


def test_a_later_error_is_located_by_the_settings_and_a_default_is_not_named(tmp_path: Path) -> None:
    settings = load_settings(
        {"port": 0}, environ={"VISION_SERVER_GALLERY": "/data"}, config_path=_empty(tmp_path)
    )
    late = settings.located(SettingsError("gallery /data is not a folder", setting="gallery"))
    assert str(late) == "gallery /data is not a folder (set by VISION_SERVER_GALLERY)"
    assert str(settings.located(SettingsError("log_file x: no", setting="log_file"))) == "log_file x: no"
    assert str(settings.located(SettingsError("two at fault"))) == "two at fault"


@pytest.mark.parametrize(
    ("config", "environ", "flags", "start", "source"),
    [
        # a value of the wrong kind, from each layer
        ("port = 'abc'\n", {}, {}, "port: cannot use 'abc': expected a whole number", "port in "),
        ("", {"VISION_SERVER_PORT": "abc"}, {}, "port: cannot use 'abc'", "VISION_SERVER_PORT"),
        ("", {}, {"port": "abc"}, "port: cannot use 'abc'", "--port"),
        # a list variable that is no JSON list
        ("", {"VISION_SERVER_MODEL": "[x"}, {}, "model: a variable's value", "VISION_SERVER_MODEL"),
        # a NAME:VALUE entry that names no model, and one that cannot be read
        ("", {}, {"revision": ("b:v2",)}, "revision: no model is named 'b'", "--revision"),
        ("idle-timeout = ['a:x']\n", {}, {}, "idle_timeout: 'a:x' is not SECONDS", "idle-timeout in "),
        # checks of a whole value; before, a message that happened to hold the source got none
        ("", {"VISION_SERVER_API_KEY": ""}, {}, "api_key is empty", "VISION_SERVER_API_KEY"),
        ("", {}, {"model": ("a=test:tiny",), "adapter": "/ad"}, "adapter: a separate adapter", "--adapter"),
        ("", {}, {"ssl_key": "/k.pem"}, "ssl_cert and ssl_key must be given together", "--ssl-key"),
        ("max-queue = 0\n", {}, {}, "max_queue must be at least 1", "max-queue in "),
    ],
)  # fmt: skip
def test_every_settings_error_says_once_at_its_end_where_the_value_was_set(
    tmp_path: Path, config: str, environ: dict[str, str], flags: dict[str, object], start: str, source: str
) -> None:
    """One shape for all: the setting first, then what is wrong, then ``(set by SOURCE)``, with
    SOURCE (a flag, a variable, a key in a config file) named nowhere else in the message."""
    path = tmp_path / "config.toml"
    path.write_text(config)
    where = f"{source}{path}" if source.endswith(" in ") else source
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=path)
    message = str(refusal.value)
    assert message.startswith(start)
    assert message.endswith(f" (set by {where})")
    assert message.count(where) == 1 and message.count("(set by") == 1


@pytest.mark.parametrize(
    ("config", "environ", "flags", "start", "source"),
    [
        ('revision = ["zz:v2"]\n', {}, {"revision": ("v1",)}, "revision: no model", "revision in "),
        ("", {"VISION_SERVER_REVISION": "v1"}, {"revision": ("zz:v2",)}, "revision: no model", "--revision"),
        ('backend = ["llava"]\n', {}, {"backend": ("a:blip",)}, "backend must be", "backend in "),
        ('backend = ["b:llava"]\n', {}, {"backend": ("a:blip",)}, "backend for b", "backend in "),
        (
            'idle-timeout = ["a:-5"]\n',
            {},
            {"idle_timeout": ("b:5",)},
            "idle_timeout for a",
            "idle-timeout in ",
        ),
        (
            "",
            {"VISION_SERVER_IDLE_TIMEOUT": "a:-5"},
            {"idle_timeout": ("60",)},
            "idle_timeout for a",
            "VISION_SERVER_IDLE_TIMEOUT",
        ),
    ],
)
def test_a_per_model_entry_says_where_that_entry_was_given(
    tmp_path: Path, config: str, environ: dict[str, str], flags: dict[str, object], start: str, source: str
) -> None:
    """``--revision``, ``--backend`` and ``--idle-timeout`` merge entry by entry across the config
    file, the environment and the flags: the refusal names where the bad entry (or server-wide
    value) came from, not the last place that gave the setting anything."""
    path = tmp_path / "config.toml"
    path.write_text('model = ["a=test:tiny", "b=test:tiny"]\n' + config)
    where = f"{source}{path}" if source.endswith(" in ") else source
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=path)
    assert str(refusal.value).startswith(start)
    assert str(refusal.value).endswith(f" (set by {where})")


def test_train_says_where_its_models_own_revision_was_set(tmp_path: Path) -> None:
    """``vision-server train`` names the sources of a model it cannot load: the revision it used
    is the model's NAME:REVISION entry from the config file, not the variable's server-wide one."""
    from vision_server.train.shared_settings import shared_settings

    config = tmp_path / "config.toml"
    config.write_text('model = ["a=test:tiny", "b=test:tiny"]\nrevision = ["a:v1"]\n')
    shared = shared_settings({}, environ={"VISION_SERVER_REVISION": "v0"}, config_path=config)
    assert (shared.revision, shared.sources["revision"]) == ("v1", f"revision in {config}")


def test_an_error_about_two_settings_names_where_each_was_set(tmp_path: Path) -> None:
    """A certificate and a key that do not go together: either may be the wrong file."""
    from vision_server.server import ssl_context

    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    settings = load_settings(
        {"ssl_cert": tmp_path / "cert.pem"},
        environ={"VISION_SERVER_SSL_KEY": str(tmp_path / "key.pem")},
        config_path=_empty(tmp_path),
    )
    with pytest.raises(SettingsError) as refusal:
        ssl_context(settings)
    located = settings.located(refusal.value)
    assert str(located).startswith(f"cannot use ssl_cert {tmp_path / 'cert.pem'} / ssl_key ")
    assert str(located).endswith(" (set by --ssl-cert and VISION_SERVER_SSL_KEY)")
    assert str(settings.located(located)) == str(located)  # located twice: still said once
    flags = {"ssl_cert": tmp_path / "cert.pem", "ssl_key": tmp_path / "key.pem"}
    both = load_settings(flags, environ={}, config_path=_empty(tmp_path))
    with pytest.raises(SettingsError) as again:
        ssl_context(both)
    assert str(both.located(again.value)).endswith(" (set by --ssl-cert and --ssl-key)")


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(environ={}, config_path=tmp_path / "nope.toml")


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def test_the_settings_reference_names_every_list_setting_and_the_json_form() -> None:
    from vision_server.settings_reference import list_note

    note = list_note()
    for flag in ("--model", "--idle-timeout", "--revision", "--backend", "--cors-origin"):
        assert f"`{flag}`" in note
    assert "`--port`" not in note and "`--adapter`" not in note
    assert "starts with `[` is read as a JSON list" in note


def test_a_list_setting_takes_its_flag_name_as_a_config_key_too(tmp_path: Path) -> None:
    """``cors-origin`` (the flag) and ``cors_origins`` (the setting) are one key; both is a mistake."""
    config = tmp_path / "flag-names.toml"
    config.write_text('cors-origin = ["http://a.test"]\ntrusted_proxy = ["10.0.0.0/8"]\n')
    settings = load_settings(environ={}, config_path=config)
    assert settings.cors_origins == ("http://a.test",)
    assert settings.trusted_proxies == ("10.0.0.0/8",)
    config.write_text('cors-origin = ["http://a.test"]\ncors_origins = ["http://b.test"]\n')
    with pytest.raises(SettingsError, match="sets cors_origins a second time"):
        load_settings(environ={}, config_path=config)


def test_serve_help_names_every_test_model_preset() -> None:
    """``--model test:...`` takes every preset the model builder has, and --help says so."""
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.florence.source import TEST_PRESETS

    result = CliRunner().invoke(main, ["serve", "--help"], terminal_width=400)
    help_text = " ".join(result.output.split())  # click wraps the text at any space
    assert result.exit_code == 0 and set(TEST_PRESETS) == {"tiny", "base", "large"}
    for preset in TEST_PRESETS:
        assert f"'test:{preset}'" in help_text, preset


@pytest.mark.parametrize(
    ("config", "environ", "flags", "expected", "source"),
    [
        ('default-model = "nope"\n', {}, {}, "default_model: no model is named 'nope'", "default-model in "),
        ("", {"VISION_SERVER_REVISION": "b:v2"}, {}, "revision: no model", "VISION_SERVER_REVISION"),
        ("", {}, {"model": ("a=test:tiny", "a=test:tiny")}, "model: the name 'a' is used twice", "--model"),
        ("", {"VISION_SERVER_IDLE_TIMEOUT": "b:5"}, {}, "idle_timeout: no", "VISION_SERVER_IDLE_TIMEOUT"),
    ],
)  # fmt: skip
def test_a_model_list_error_says_where_its_setting_was_set(
    tmp_path: Path, config: str, environ: dict[str, str], flags: dict[str, object], expected: str, source: str
) -> None:
    """The model list and what names its models are checked together; the message still says
    which setting was at fault and where it was given."""
    path = tmp_path / "config.toml"
    path.write_text(config)
    with pytest.raises(SettingsError) as refusal:
        load_settings(flags, environ=environ, config_path=path)
    assert str(refusal.value).startswith(expected)
    assert str(refusal.value).endswith(f"(set by {source}{path if config else ''})")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("gallery = true", "gallery: cannot use True: expected a path"),
        ('cache_dir = ["a"]', "cache_dir: cannot use ['a']: expected a path"),
        ("memory_budget = true", "memory_budget: cannot use True: expected text"),
        ('model = [["a"]]', "model: cannot use [['a']]: expected a list of text, not of lists"),
        ('model = ["a", true]', "model: cannot use ['a', True]: expected a list of text"),
        ("cors_origins = {a = 1}", "cors_origins: cannot use {'a': 1}: expected text or a list of text"),
    ],
)
def test_a_config_value_of_another_kind_is_refused_not_read_as_its_text(
    tmp_path: Path, line: str, message: str
) -> None:
    """``gallery = true`` served a folder named True; ``model = [["a"]]`` a model named "['a']"."""
    config = tmp_path / "config.toml"
    config.write_text(line + "\n")
    with pytest.raises(SettingsError) as refusal:
        load_settings(environ={}, config_path=config)
    key = line.split(" =")[0]
    assert str(refusal.value).startswith(message)
    assert str(refusal.value).endswith(f" (set by {key} in {config})")


def test_a_config_number_where_text_belongs_is_its_text(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("api_key = 123456\nmodel = 7\n")
    settings = load_settings(environ={}, config_path=config)
    assert (settings.api_key, settings.model) == ("123456", ("7",))


@pytest.mark.parametrize(
    ("config", "environ", "message"),
    [
        ("", {"VISION_SERVER_IDLE_TIMEOUT": "nan"}, "idle_timeout must be a finite number, not nan"),
        ("request_timeout = inf\n", {}, "request_timeout must be a finite number, not inf"),
        ("", {"VISION_SERVER_SHUTDOWN_GRACE": "inf"}, "shutdown_grace must be a finite number, not inf"),
        ("", {"VISION_SERVER_OFFLOAD_TIMEOUT": "NaN"}, "offload_timeout must be a finite number, not nan"),
        (
            'model = ["a=test:tiny"]\nidle_timeout = ["a:nan"]\n',
            {},
            "idle_timeout for a must be a finite number of seconds, or -1 for never (not nan)",
        ),
    ],
)
def test_nan_and_infinity_are_no_numbers_of_seconds(
    tmp_path: Path, config: str, environ: dict[str, str], message: str
) -> None:
    """``float()`` reads them, and ``nan < 0`` is false, so they passed every range check."""
    path = tmp_path / "config.toml"
    path.write_text(config)
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(environ=environ, config_path=path)
