"""The test suite's own layout: every test module sits in a layer, and the layers are markers."""

from __future__ import annotations

import sys

from tests.conftest import LAYERS, TESTS, layer_of
from tests.support import paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_every_test_module_is_in_a_layer_directory() -> None:
    strays = [path.relative_to(TESTS) for path in TESTS.rglob("test_*.py") if layer_of(path) is None]
    assert not strays, f"move these into tests/unit, tests/http or tests/system: {strays}"


def test_the_layer_is_the_first_directory_under_tests() -> None:
    assert layer_of(TESTS / "unit" / "test_x.py") == "unit"
    assert layer_of(TESTS / "system" / "deeper" / "test_x.py") == "system"
    assert layer_of(TESTS / "support" / "test_x.py") is None
    assert layer_of(TESTS / "test_x.py") is None


def test_each_layer_is_a_registered_marker() -> None:
    config = tomllib.loads((paths.REPO / "pyproject.toml").read_text(encoding="utf-8"))
    options = config["tool"]["pytest"]["ini_options"]
    registered = {line.split(":", 1)[0] for line in options["markers"]}
    assert set(LAYERS) <= registered and "--strict-markers" in options["addopts"]


def test_no_blanket_warning_filter() -> None:
    options = tomllib.loads((paths.REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]
    assert not any(
        entry == "ignore::DeprecationWarning" for entry in options["ini_options"].get("filterwarnings", [])
    )
