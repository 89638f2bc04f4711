"""The repository keeps its promises: README commands, documented options, lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths
from vision_server import settings_reference
from vision_server.settings import FIELDS, default_config_path, env_name, flag_name, read_config_file
from vision_server.settings_reference import with_table

ROOT = paths.REPO


def readme_commands() -> list[str]:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_quick_start_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    install, test = readme_commands()[:2]
    assert "pip install" in install and "vision-server serve" in install
    assert "[test]" in test and "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_the_configuration_reference_is_generated_from_settings() -> None:
    """The page's table is what ``vision_server.settings_reference`` renders now, one row per setting."""
    page = ROOT / "docs" / "configuration.md"
    text = page.read_text(encoding="utf-8")
    assert with_table(text) == text, (
        f"run: python -m vision_server.settings_reference {page.relative_to(ROOT)}"
    )
    missing = [name for name in FIELDS if f"| `{flag_name(name)}` | `{env_name(name)}` |" not in text]
    assert missing == []


def test_the_settings_reference_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    stale = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").replace("`--port`", "`--prt`")
    page = tmp_path / "configuration.md"
    page.write_text(stale, encoding="utf-8")
    assert settings_reference.main([str(page), "--check"]) == 1
    assert settings_reference.main([str(page)]) == 0
    assert settings_reference.main([str(page), "--check"]) == 0
    assert "`--port`" in page.read_text(encoding="utf-8")


def test_the_configuration_example_is_a_valid_config_file(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    examples = re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)
    assert examples
    for example in examples:
        path = tmp_path / "config.toml"
        path.write_text(example, encoding="utf-8")
        assert read_config_file(path)


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vision_server", "serve", "--help"], capture_output=True, text=True, check=True
    )
    missing = [name for name in FIELDS if flag_name(name) not in result.stdout]
    assert missing == []
    # Where the config file is looked for, as a path (was "the platformdirs user config dir").
    assert str(default_config_path()) in " ".join(result.stdout.split()).replace("- ", "-")


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
def test_ruff_is_clean() -> None:
    result = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ci_runs_the_gates_in_order_before_the_tests() -> None:
    """ruff check, ruff format --check, mypy as 3.11 and as 3.10 see the code (in .ci/gates), all
    before the docs build and pytest."""
    gates = [line for line in (ROOT / ".ci" / "gates").read_text().splitlines() if line and line[0] != "#"]
    commands = [line for line in gates if line.split()[0] in ("ruff", "mypy")]
    assert commands == ["ruff check .", "ruff format --check .", "mypy", "mypy --python-version 3.10"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    order = [ci.index(".ci/gates"), *(i for i, line in enumerate(ci) if "mkdocs build" in line)]
    assert order == sorted(order) and order[-1] < ci.index(readme_commands()[1])
    assert "--cov" in readme_commands()[1]
