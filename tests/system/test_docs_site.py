"""The documentation site builds offline with ``mkdocs build --strict``: no broken link or anchor,
no page left out of the nav, no snippet that points nowhere (CI runs the same build first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import paths

ROOT = paths.REPO


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_the_site_loads_nothing_from_the_network() -> None:
    """Material's web fonts come from Google at view time unless ``theme.font`` is false."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "\n  font: false\n" in config
    assert "plugins:" not in config  # the default (local search) only; a plugin could fetch
