"""The lock that keeps a second run out of a JSONL/Parquet output another run is writing.

Two holders in one process conflict as two processes do (``flock`` belongs to the open file),
so the rules can be checked here; tests/system/test_two_runs.py runs two real commands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vision_server.output_lock import OutputBusy, holding, lock_path


def test_a_second_holder_is_refused_at_once_naming_the_output_and_gets_it_once_free(tmp_path: Path) -> None:
    jsonl, parquet = tmp_path / "captions.jsonl", tmp_path / "captions.parquet"
    with holding([jsonl]):
        with pytest.raises(OutputBusy) as refused, holding([parquet, jsonl]):
            pass
        assert refused.value.output == jsonl
        assert "captions.jsonl is being written by another run" in str(refused.value)
        assert ".captions.jsonl.lock" in str(refused.value)
        with holding([parquet]):  # the refused one let go of the lock it had taken
            pass
    with holding([jsonl, parquet]):  # free again once the first holder is done
        pass
    assert not jsonl.exists() and not parquet.exists()  # the outputs themselves are not touched


def test_every_spelling_of_one_output_shares_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "data" / "captions.jsonl"
    real.parent.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    monkeypatch.chdir(real.parent)
    assert lock_path(Path("captions.jsonl")) == lock_path(link) == real.parent / ".captions.jsonl.lock"
    with holding([link]), pytest.raises(OutputBusy):
        with holding([Path("./captions.jsonl")]):
            pass


def test_a_lock_file_that_cannot_be_made_is_warned_about_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # (a folder this user may not write to, in real life; root may write anywhere, so here its
    # name is taken by a folder)
    output = tmp_path / "captions.jsonl"
    (tmp_path / ".captions.jsonl.lock").mkdir()
    with caplog.at_level(logging.WARNING, logger="vision_server.output_lock"), holding([output]):
        pass
    assert "cannot create the lock file" in caplog.text and "nothing stops another run" in caplog.text
