"""The configuration reference (docs/configuration.md) against the real ``vision-server serve``:
every row is a flag it takes, with the variable and the default its ``--help`` names, every
option it has is a row, and every setting is a config-file key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest

from tests.support import paths
from vision_server.cli import main
from vision_server.settings import FIELDS, Settings, flag_name, load_settings
from vision_server.settings_reference import BEGIN, END

SERVE = main.commands["serve"]
CAPTION = main.commands["caption"]
# Rows whose default the docs describe (the value depends on the machine) and what --help says.
DESCRIBED = {"--cache-dir": str(FIELDS["cache_dir"].default), "--max-batch-size": "unset"}


def rows() -> list[tuple[str, str, str]]:
    """(flag, variable, default cell) of each row of the generated table."""
    table = (paths.DOCS / "configuration.md").read_text(encoding="utf-8").split(BEGIN)[1].split(END)[0]
    found = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("| `--"):
            found.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return found


def help_default(param: click.Option) -> tuple[str, str]:
    """(default, variable) from the ``[default: ...; env: ...]`` that ends an option's help."""
    shown = re.search(r"\[default: (.*); env: (\w+)\]( \(repeatable\))?$", param.help or "", re.S)
    assert shown is not None, param.help
    return " ".join(shown.group(1).split()), shown.group(2)


def options(command: click.Command) -> dict[str, click.Option]:
    return {param.opts[0]: param for param in command.params if isinstance(param, click.Option)}


ROWS = rows()


def test_every_serve_option_is_a_row_and_every_row_an_option() -> None:
    documented = {flag for flag, _, _ in ROWS}
    assert documented == set(options(SERVE)) - {"--config", "--help"}
    assert documented == {flag_name(name) for name in FIELDS}


@pytest.mark.parametrize(("flag", "variable", "cell"), ROWS, ids=[row[0] for row in ROWS])
def test_a_row_says_what_serve_help_says(flag: str, variable: str, cell: str) -> None:
    default, env = help_default(options(SERVE)[flag])
    assert env == variable
    expected = DESCRIBED.get(flag, cell.replace("`", ""))
    assert default == expected, f"docs say {flag} defaults to {cell}; --help says {default}"
    if flag in options(CAPTION):  # the offline command takes the same setting the same way
        assert help_default(options(CAPTION)[flag]) == (default, env)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\") + '"'


@pytest.mark.parametrize("spelling", ["setting", "flag"])
def test_every_setting_is_a_config_key(tmp_path: Path, spelling: str) -> None:
    """Each setting's default written into a config file (as the setting's name, or as its flag
    without the dashes) reads back as the defaults."""
    config = tmp_path / "config.toml"
    lines = [
        f"{name if spelling == 'setting' else flag_name(name)[2:]} = {_toml(spec.default)}"
        for name, spec in FIELDS.items()
        if spec.default is not None
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(lines) > 30
    assert load_settings(environ={}, config_path=config) == Settings()
