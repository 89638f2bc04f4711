"""A path column none of whose files exists is judged a folder at a time, not one ``stat`` per
row, and the answers stay those of :func:`os.path.exists` (a column with a file is never refused)."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import save
from vision_server.file_presence import LIST_AFTER, FilePresence
from vision_server.parquet_images import paths_problem

ROWS = 5_000


@pytest.fixture
def stats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``os.stat`` made while the test runs (``Path.exists`` and ``os.path.exists`` both ask it)."""
    seen: list[str] = []
    real: Callable[..., Any] = os.stat

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    return seen


def test_a_moved_folder_costs_a_look_per_folder_not_per_row(tmp_path: Path, stats: list[str]) -> None:
    values = [f"images/{row // 1000}/{row}.png" for row in range(ROWS)]
    problem = paths_problem(tmp_path / "set.parquet", "file", values)
    assert problem is not None and f"none of its {ROWS} values is an existing file" in problem
    assert len(stats) <= 2 * (ROWS // 1000)  # before: one per row


def test_files_gone_from_a_folder_that_is_there_cost_one_listing(tmp_path: Path, stats: list[str]) -> None:
    (tmp_path / "other.png").write_bytes(b"x")
    values = [f"{row}.png" for row in range(ROWS)] + ["a caption, not a file"] * ROWS
    problem = paths_problem(tmp_path / "set.parquet", "text", values)
    assert problem is not None and f"none of its {2 * ROWS} values" in problem
    assert len(stats) <= LIST_AFTER + 1  # before: one per row


def test_a_column_whose_only_file_comes_last_is_not_refused(tmp_path: Path) -> None:
    save(tmp_path / "images" / "Last.PNG", 1)
    missing = [f"images/{row}.png" for row in range(ROWS)] + [f"gone/{row}.png" for row in range(ROWS)]
    assert paths_problem(tmp_path / "set.parquet", "file", [*missing, "images/Last.PNG"]) is None
    absolute = str(tmp_path / "images" / "Last.PNG")
    assert paths_problem(tmp_path / "set.parquet", "file", [*missing, absolute]) is None


def names_to_ask(folder: Path) -> list[str]:
    """Names a listing must not rule out wrongly: case and Unicode variants, dots, short names."""
    accented = unicodedata.normalize("NFD", "café.png")
    for name in ("a.png", "B.png", accented, "dir"):
        (folder / name).mkdir() if name == "dir" else (folder / name).write_bytes(b"x")
    (folder / "broken").symlink_to(folder / "nowhere")
    asked = ["a.png", "A.PNG", "b.png", "B.png", "a.png.", "a.png ", "café.png", accented, "dir", ".", ".."]
    return [*asked, "A~1.PNG", "broken", "nowhere", "a.png/x", "dir/../a.png", "dir/x/y", ""]


def test_answers_are_those_of_os_path_exists_around_a_listing(tmp_path: Path, stats: list[str]) -> None:
    asked = [os.path.join(tmp_path, name) for name in names_to_ask(tmp_path)]
    presence = FilePresence()
    for path in asked:  # before the folder is listed
        assert presence.exists(path) == os.path.exists(path), path
    for row in range(LIST_AFTER):
        assert not presence.exists(os.path.join(tmp_path, f"missing-{row}.png"))
    stats.clear()
    assert not presence.exists(os.path.join(tmp_path, "not-listed.png"))
    assert not stats  # the listing ruled it out
    for path in asked:  # after: what the listing rules out is what does not exist
        assert presence.exists(path) == os.path.exists(path), path
    gone = [os.path.join(tmp_path, "gone", os.path.relpath(path, tmp_path)) for path in asked]
    assert [presence.exists(path) for path in gone] == [os.path.exists(path) for path in gone]


def test_names_no_listing_can_judge_are_looked_up_after_one(tmp_path: Path, stats: list[str]) -> None:
    """On Windows ``C:cat.png`` names a file of drive C's working folder and
    ``cat.png:Zone.Identifier`` a stream of ``cat.png``, and ``CAT~1.PNG`` may be a short name:
    none of them is in a listing of the folder, so a listing must not rule them out."""
    presence = FilePresence()
    for row in range(LIST_AFTER):
        assert not presence.exists(os.path.join(tmp_path, f"missing-{row}.png"))
    stats.clear()
    for name in ("cat.png:Zone.Identifier", "C:cat.png", "CAT~1.PNG"):
        assert not presence.exists(os.path.join(tmp_path, name))
    assert len(stats) == 3  # each looked up itself
