"""``Settings(...)`` built in Python (the engine without HTTP or the CLI): each argument is taken
in its field's type, turned into it where the meaning is plain, or refused naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vision_server.settings import FIELDS, Settings, SettingsError, SettingsTypeError, is_list

# A valid single value of every setting typed as a tuple of str.
ONE_VALUE = {
    "model": "test:tiny",
    "cors_origins": "http://a.test",
    "trusted_proxies": "10.0.0.0/8",
    "allowed_hosts": "vision.lan",
}


def test_every_tuple_of_str_setting_has_a_sample_here() -> None:
    tuples = {name for name in FIELDS if is_list(name) and not FIELDS[name].metadata.get("entries")}
    assert tuples == set(ONE_VALUE)


@pytest.mark.parametrize(("name", "value"), ONE_VALUE.items())
def test_one_str_is_a_one_item_tuple_not_its_characters(name: str, value: str) -> None:
    arguments: dict[str, Any] = {name: value}  # the str shorthand under test (typed as a tuple)
    settings = Settings(**arguments)
    assert getattr(settings, name) == (value,)


def test_lists_become_tuples_paths_become_paths_and_whole_numbers_count_as_numbers(tmp_path: Path) -> None:
    settings = Settings(
        model=["a=test:tiny", "b=test:tiny"],  # type: ignore[arg-type]  # the list shorthand under test
        model_idle_timeouts={"b": 5},  # type: ignore[arg-type]  # a mapping for the (NAME, VALUE) pairs
        cache_dir=str(tmp_path),  # type: ignore[arg-type]  # the str shorthand under test
        idle_timeout=10,
    )
    assert settings.model == ("a=test:tiny", "b=test:tiny")
    assert settings.model_idle_timeouts == (("b", 5.0),)
    assert settings.cache_dir == tmp_path and isinstance(settings.cache_dir, Path)
    assert settings.idle_timeout == 10.0 and isinstance(settings.idle_timeout, float)
    assert [spec.idle_timeout for spec in settings.model_specs] == [None, 5.0]  # None: the server-wide one
    hash(settings)  # frozen and hashable: no list left inside


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"port": "8080"}, "Settings(port=...): expected a whole number (int), not str '8080'"),
        ({"port": 8080.5}, "Settings(port=...): expected a whole number (int), not float 8080.5"),
        ({"num_beams": True}, "Settings(num_beams=...): expected a whole number (int), not bool True"),
        ({"preload": "no"}, "Settings(preload=...): expected True or False, not str 'no'"),
        ({"max_batch_size": "3"}, "Settings(max_batch_size=...): expected a whole number (int) or None"),
        ({"model": ("test:tiny", 3)}, "Settings(model=...): item 1: expected a str, not int 3"),
        ({"model": None}, "Settings(model=...): expected a tuple of str (or one str), not NoneType None"),
        ({"api_key": 5}, "Settings(api_key=...): expected a str or None, not int 5"),
        ({"device": None}, "Settings(device=...): expected a str, not NoneType None"),
        ({"max_request_bytes": "20MiB"}, "Settings(max_request_bytes=...): expected a whole number (int)"),
        (
            {"idle_timeout": "big:60"},
            "expected a number (int or float), not str 'big:60'; one model's own value goes in "
            "model_idle_timeouts as (NAME, VALUE) pairs",
        ),
        ({"model_idle_timeouts": (("big",),)}, "Settings(model_idle_timeouts=...): item 0: expected a tuple"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(
    arguments: dict[str, Any], message: str
) -> None:
    """Before, these failed late (a TypeError from a comparison that named nothing) or not at all
    (``preload="no"`` served as preloading, since a non-empty string is true)."""
    with pytest.raises(SettingsTypeError) as refusal:
        Settings(**arguments)
    assert message in str(refusal.value)
    assert isinstance(refusal.value, TypeError) and isinstance(refusal.value, SettingsError)
    assert refusal.value.setting == next(iter(arguments))
