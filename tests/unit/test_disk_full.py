"""A full disk is recognised whichever library met it: Python's ``OSError``, or a library written in
Rust (safetensors, which writes every adapter and checkpoint) that raises its own error with the
errno only in its text. The errors here are real: safetensors writing under a file size limit
(``tests.support.full_disk.file_size_limit``), and into a folder that does not exist."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.support.full_disk import file_size_limit
from vision_server.client.errors import VisionClientError
from vision_server.disk_full import DiskFull, as_disk_full, is_disk_full, raise_as_disk_full

WEIGHTS = {"w": torch.zeros(64, 1024)}  # 256 KiB: far past the limit below


def _safetensors_error(path: Path, limit: int | None = None) -> BaseException:
    try:
        if limit is None:
            save_file(WEIGHTS, str(path))
        else:
            with file_size_limit(limit):
                save_file(WEIGHTS, str(path))
    except Exception as exc:  # the error is what the test looks at
        return exc
    raise AssertionError(f"safetensors wrote {path}")


def test_a_rust_library_s_full_disk_error_is_a_full_disk(tmp_path: Path) -> None:
    error = _safetensors_error(tmp_path / "adapter.safetensors", limit=4096)
    assert not isinstance(error, OSError) and "(os error 27)" in str(error)  # what safetensors says
    assert is_disk_full(error)
    named = as_disk_full(tmp_path / "adapter.safetensors", error)
    assert isinstance(named, DiskFull) and named.errno == errno.EFBIG
    reason = "file too large: no space left within the size limit"
    assert str(named) == f"cannot write {tmp_path / 'adapter.safetensors'}: {reason}"
    with pytest.raises(DiskFull) as raised:
        raise_as_disk_full(tmp_path / "checkpoint", error)
    assert raised.value.filename == str(tmp_path / "checkpoint") and raised.value.__cause__ is error


def test_a_rust_library_s_other_errors_are_not_a_full_disk(tmp_path: Path) -> None:
    error = _safetensors_error(tmp_path / "missing" / "adapter.safetensors")
    assert "(os error 2)" in str(error)  # no such file or directory
    assert not is_disk_full(error)
    assert as_disk_full(tmp_path / "adapter.safetensors", error) is error
    assert not is_disk_full(ValueError("shape (os error 9999) of no errno"))


def test_os_errors_are_read_by_their_errno() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied (os error 28)"))
    assert not is_disk_full(None)


def test_other_errors_quoting_a_rust_errno_are_not_a_full_disk(tmp_path: Path) -> None:
    """A server's message relayed by the client may quote Rust's words; only the Rust
    libraries' own errors are read, so such a message never stops a run as a full disk here."""
    relayed = VisionClientError("HTTP 500: cannot save: No space left on device (os error 28)")
    assert not is_disk_full(relayed)
    assert as_disk_full(tmp_path / "a.txt", relayed) is relayed
