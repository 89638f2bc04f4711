"""The one temp-file → flush → rename → clean-up rule every in-place rewrite goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vision_server.atomic_files import replacing


def test_the_written_temp_file_replaces_the_target(tmp_path: Path) -> None:
    target, temp = tmp_path / "out.txt", tmp_path / ".out.tmp"
    target.write_text("old")
    with replacing(target, temp) as writing:
        assert writing == temp
        writing.write_text("new")
        assert target.read_text() == "old"  # nothing shows until the body is done
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("durable", [True, False])
def test_an_error_in_the_body_leaves_the_target_and_no_temp_file(tmp_path: Path, durable: bool) -> None:
    target, temp = tmp_path / "out.txt", tmp_path / ".out.tmp"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), replacing(target, temp, durable=durable) as writing:
        writing.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_a_failed_flush_leaves_the_target_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "out.txt"
    with pytest.raises(OSError, match="No space"), replacing(target, tmp_path / ".out.tmp") as writing:
        writing.write_text("new")
    assert list(tmp_path.iterdir()) == []
