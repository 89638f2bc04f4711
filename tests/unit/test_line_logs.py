"""JSON Lines appends are whole lines or nothing, also when the file may grow no more.

The limit is real: ``RLIMIT_FSIZE`` makes the kernel cut a write short at the limit and refuse the
next one (``EFBIG``; Python ignores the SIGXFSZ that comes with it), as a full disk cuts a write
short at the last free block. ``/dev/full`` refuses every write with ``ENOSPC``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.support.full_disk import file_size_limit
from vision_server.disk_full import DiskFull
from vision_server.line_logs import LineLog
from vision_server.logs import file_handler


def line(n: int) -> str:
    return json.dumps({"n": n, "caption": "word " * 55}) + "\n"  # about 300 bytes


def test_a_line_cut_short_by_the_limit_is_taken_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    log = LineLog(path)
    written = 0
    with file_size_limit(1000), pytest.raises(DiskFull) as refused:
        for n in range(10):
            log.append(line(n))
            written += 1
    assert written == 3  # the fourth crossed the limit: 100 bytes went in before the refusal
    assert path.read_text() == "".join(line(n) for n in range(3))  # and came out again
    assert refused.value.filename == str(path)
    assert str(refused.value) == f"cannot write {path}: file too large: no space left within the size limit"

    log.append(line(3))  # room again (space freed): the next line follows the whole ones
    log.close()
    assert [json.loads(text)["n"] for text in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_a_full_device_names_the_file() -> None:
    log = LineLog(Path("/dev/full"))
    with pytest.raises(DiskFull, match="cannot write /dev/full: no space left on the device"):
        log.append(line(0))
    log.close()


def test_a_torn_last_line_of_a_killed_run_is_ended_first(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(line(0) + '{"n": 1, "capt')  # kill -9 in the middle of a write
    log = LineLog(path)
    log.append(line(2))
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(lines[0])["n"], json.loads(lines[2])["n"]] == [0, 2] and lines[1] == '{"n": 1, "capt'


def test_a_log_file_that_may_grow_no_more_is_said_once_in_its_own_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --log-file past a size limit (or a quota): the one line on stderr said "no space left on
    # the device" for every cause; now in the words every tool uses for it.
    handler = file_handler(tmp_path / "server.log")
    logger = logging.getLogger("test_line_logs.full_log_file")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with file_size_limit(1000):
            for n in range(30):
                logger.warning("line %d %s", n, "x" * 100)
    finally:
        logger.removeHandler(handler)
        handler.close()
    said = capsys.readouterr().err
    assert said.count("cannot write the log file") == 1, said
    assert (
        f"cannot write the log file {tmp_path / 'server.log'}: file too large: no space left within" in said
    )
