"""The defaults the docs' option tables quote are the commands' real defaults.

docs/configuration.md is generated from ``Settings`` (tests/system/test_project.py); the option
tables written by hand are checked here against the click commands they describe:
``vision-server train`` (docs/training.md), ``vision-server caption`` (docs/caption-a-dataset.md),
``vision-client folder`` (docs/clients/cli.md) and the folder clients' shared options
(docs/clients/index.md, ``vision-client``'s side). A row may name several options
(``--rank``, ``--alpha``, ``--lora-dropout`` with ``4, 4, 0.05``) or one default for all.
"""

from __future__ import annotations

import re

import click
import pytest

from tests.support import paths
from vision_server.cli import main as server_main
from vision_server.client.cli import main as client_main

UNSET_WORDS = {"", "unset", "off"}  # no value: None, or False for a flag
WORDS = {"empty": "", "one space": " ", "a space": " "}
TABLES = {  # page: (table header, the commands whose options its rows name, first found wins)
    "training.md": ("| option | default | what it does |", [server_main.commands["train"]]),
    "caption-a-dataset.md": ("| option | default | meaning |", [server_main.commands["caption"]]),
    "clients/cli.md": ("| option | default | what it does |", [client_main.commands["folder"]]),
    "clients/index.md": (
        "| option (`vision-client`, bash / PowerShell) | default | what it does |",
        [client_main.commands["folder"], client_main],
    ),
}


def table_rows(page: str, header: str) -> list[tuple[list[str], str]]:
    """(the long options of the row's first cell, its default cell) for each row under ``header``."""
    text = (paths.DOCS / page).read_text(encoding="utf-8")
    assert header in text, f"{page} has no table headed {header}"
    rows = []
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append((re.findall(r"`(--[\w-]+)", cells[0]), cells[1]))
    return rows


def option(commands: list[click.Command], name: str) -> click.Option:
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
                return param
    raise AssertionError(f"no command here has {name}")


def real_default(param: click.Option) -> object:
    default = param.default
    if default is None or type(default).__name__ == "Sentinel":  # click's "no default"
        return False if param.is_flag else None
    return default


def same(shown: str, param: click.Option) -> bool:
    """Whether the docs' words for a default mean ``param``'s default."""
    value = re.sub(r"\s*\(.*\)$", "", shown.replace("`", "").strip())  # "600 (`vision-client`)"
    default = real_default(param)
    if value in WORDS:
        return default == WORDS[value]
    if value in UNSET_WORDS:
        return default in (None, False)
    if value == param.name:  # "recursive" for --recursive/--no-recursive
        return default is True
    try:
        return float(value) == float(default)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value == str(default)


def checked_rows() -> list[tuple[str, str, str, click.Option]]:
    """(page, option, its default as the docs say it, the option) for every checkable row."""
    found = []
    for page, (header, commands) in TABLES.items():
        for names, cell in table_rows(page, header):
            if "as for" in cell:  # "as for `serve`": described, not quoted
                continue
            params = list({id(p): p for p in (option(commands, name) for name in names)}.values())
            if page == "clients/index.md":
                values = [re.split(r",\s*", cell)[0]]  # vision-client's figure comes first
            else:
                values = re.split(r"\s*/\s*|,\s*", cell) if len(params) > 1 else [cell]
            if len(values) == 1:
                values = values * len(params)
            assert len(values) == len(params), f"{page}: {names} has defaults {cell!r}"
            found += [(page, p.opts[-1], value, p) for p, value in zip(params, values, strict=True)]
    return found


ROWS = checked_rows()


def test_the_tables_are_found() -> None:
    assert len(ROWS) > 40 and {page for page, *_ in ROWS} == set(TABLES)


@pytest.mark.parametrize(("page", "name", "shown", "param"), ROWS, ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_a_documented_default_is_the_real_one(page: str, name: str, shown: str, param: click.Option) -> None:
    real = real_default(param)
    assert same(shown, param), f"{page} says {name} defaults to {shown!r}; it is {real!r}"


def test_a_wrong_default_is_caught() -> None:
    epochs = option([server_main.commands["train"]], "--epochs")
    assert same("5", epochs) and not same("3", epochs)
    separator = option([client_main.commands["folder"]], "--separator")
    assert same("one space", separator) and not same("empty", separator)
    limit = option([client_main.commands["folder"]], "--limit")
    assert same("", limit) and not same("100", limit)
