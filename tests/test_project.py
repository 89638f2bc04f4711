"""The repository keeps its promises: README commands, documented options, lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vision_server.settings import FIELDS, flag_name

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_quick_start_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    install, test = readme_commands()[:2]
    assert "pip install" in install and "vision-server serve" in install
    assert "[test]" in test and "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in FIELDS if f"`{flag_name(name)}`" not in readme]
    assert missing == []


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vision_server", "serve", "--help"], capture_output=True, text=True, check=True
    )
    missing = [name for name in FIELDS if flag_name(name) not in result.stdout]
    assert missing == []


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
def test_ruff_is_clean() -> None:
    result = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
