"""What ``pip`` and a distribution packager get: the wheel and the sdist built from this tree.

CI installs the project in editable mode, which reads the checkout; only a real build shows what
``pip install vision-server`` or a distro package would hold. Both are built here with
setuptools' own backend (no network, no build isolation) from a copy of the project's files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support import paths

ROOT = paths.REPO
# What is not the project's: caches, virtual environments and build outputs of a working copy.
NOT_OURS = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", ".*cache", ".venv*", ".ci-venv*", "venv", "build", "dist",
    "site", ".ci-site", "*.egg-info", ".coverage*", ".whl",
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) built from a copy of the project, as ``python -m build`` would."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=NOT_OURS, symlinks=True)
    out = work / "dist"
    script = (  # the backend rewrites sys.argv: keep the output folder first
        "import sys; from setuptools import build_meta as b; out = sys.argv[1]; "
        "s = b.build_sdist(out); w = b.build_wheel(out); print('BUILT', s, w)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sdist_name, wheel_name = done.stdout.rpartition("BUILT ")[2].split()
    return out / wheel_name, out / sdist_name


def tracked_files() -> set[str]:
    """The project's files: git's list when this is a checkout, else every file of the copy."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip("not a git checkout: the project's file list is unknown")
    return {line for line in listed.stdout.splitlines() if (ROOT / line).is_file()}


def test_the_sdist_holds_the_whole_project(built: tuple[Path, Path]) -> None:
    """Tests, docs, clients and service files too, so a packager can run the suite from it."""
    _, sdist = built
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in archive.getnames()}
    missing = sorted(tracked_files() - names)
    assert missing == [], f"not in the sdist (MANIFEST.in): {missing[:20]}"
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_wheel_holds_the_package_its_page_and_its_commands(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    package = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "vision_server").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert sorted(package - names) == []
    assert {name.split("/")[0] for name in names} == {"vision_server", info.split("/")[0]}
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert f"\nVersion: {version}\n" in metadata
    assert "vision-server = vision_server.cli:main" in entry_points
    assert "vision-client = vision_server.client.cli:main" in entry_points


def test_the_build_backend_floor_reads_the_license_field() -> None:
    """``license = "MIT"`` (an SPDX expression, PEP 639) is read by setuptools 77 and later;
    68 to 76 stop the build with "`project.license` must be valid exactly by one definition".
    The floor in ``[build-system]`` is what a distribution's own setuptools is held to."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    requires = re.search(r'^requires = \["setuptools>=(\d+)', pyproject, re.MULTILINE)
    assert requires is not None, "[build-system] requires names no setuptools floor"
    if re.search(r'^license = "', pyproject, re.MULTILINE):
        assert int(requires.group(1)) >= 77, requires.group(0)
