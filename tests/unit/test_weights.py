"""Weight sizes from file headers (no tensor data read) and from loaded modules."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vision_server.weights import (
    TensorInfo,
    WeightsFileError,
    estimate_bytes,
    module_bytes,
    read_bin_tensors,
    read_safetensors_header,
    weight_files,
)


def state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(3, 5, dtype=torch.float32),
        "h": torch.zeros(7, dtype=torch.float16),
        "b": torch.zeros(2, 2, dtype=torch.bfloat16),
        "ids": torch.zeros(11, dtype=torch.int64),
        "mask": torch.zeros(4, dtype=torch.bool),
    }


def test_header_gives_shapes_and_types(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(state(), str(path), metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header == {
        "w": TensorInfo((3, 5), 32, True),
        "h": TensorInfo((7,), 16, True),
        "b": TensorInfo((2, 2), 16, True),
        "ids": TensorInfo((11,), 64, False),
        "mask": TensorInfo((4,), 8, False),
    }


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, (15 + 7 + 4) * 4 + 11 * 8 + 4),
        (torch.float16, (15 + 7 + 4) * 2 + 11 * 8 + 4),
        (torch.bfloat16, (15 + 7 + 4) * 2 + 11 * 8 + 4),
    ],
)
def test_floats_count_at_the_load_dtype_others_at_their_own(
    tmp_path: Path, dtype: torch.dtype, expected: int
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(state(), str(path))
    assert estimate_bytes([path], dtype) == expected


def test_the_estimate_equals_what_loading_takes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(state(), str(path))
    loaded = {name: t.to(torch.float16) if t.is_floating_point() else t for name, t in state().items()}
    assert estimate_bytes([path], torch.float16) == sum(t.nbytes for t in loaded.values())


def test_bin_checkpoints_are_read_through_a_memory_map(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(state(), path)
    assert read_bin_tensors(path)["ids"] == TensorInfo((11,), 64, False)
    assert estimate_bytes([path], torch.float32) == (15 + 7 + 4) * 4 + 11 * 8 + 4


def test_sharded_checkpoints_sum_their_shards(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(10)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(6)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = weight_files(tmp_path)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert estimate_bytes(files, torch.float16) == 16 * 2


def test_safetensors_wins_over_bin_and_no_files_means_unknown(tmp_path: Path) -> None:
    assert weight_files(tmp_path) == []
    assert estimate_bytes(weight_files(tmp_path), torch.float32) is None
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x05\x00",
        struct.pack("<Q", 50) + b"{}",
        struct.pack("<Q", 4) + b"[1,]",
        struct.pack("<Q", 2**40),
    ],
    ids=["empty", "short", "truncated", "not-json", "huge-length"],
)
def test_unreadable_headers_are_errors_and_count_at_file_size(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError):
        read_safetensors_header(path)
    assert estimate_bytes([path], torch.float32) == len(content)


def test_module_bytes_counts_tied_weights_once_and_can_skip() -> None:
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as a language model's output layer
    model = torch.nn.ModuleDict({"embed": embed, "head": head, "norm": torch.nn.LayerNorm(4)})
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    assert module_bytes(model) == 10 * 4 * 4 + 2 * 4 * 4 + 3 * 8
    assert module_bytes(model, skip=lambda name: name.startswith("norm.")) == 10 * 4 * 4 + 3 * 8
