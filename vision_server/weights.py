"""How much memory a checkpoint's weights take, from its files' headers, and what a module holds.

``--memory-budget`` needs a model's size before it is loaded, to evict others first. Loading
to find out would defeat the purpose, so the estimate reads only what describes the tensors:
a safetensors file's JSON header (8-byte length, then shapes and dtypes) or, for a ``.bin``,
the pickle's tensor records through a memory map (the data pages are never read). Floating
tensors count at the dtype the model will be loaded in; integer and boolean ones keep theirs.
Once loaded, :func:`module_bytes` measures the real thing.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors itself refuses larger headers
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# Which files transformers reads, in its order of preference; the first present wins.
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class WeightsFileError(ValueError):
    """A weights file whose header cannot be read (truncated, not safetensors, corrupt)."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as its header describes it: shape, element width, whether it is a float."""

    shape: tuple[int, ...]
    bits: int
    floating: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def loaded_bytes(self, float_dtype: torch.dtype) -> int:
        """Bytes once loaded: floats take ``float_dtype``, other tensors keep their own type."""
        bits = float_dtype.itemsize * 8 if self.floating else self.bits
        return (self.numel * bits + 7) // 8


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file describes, reading its header only (no tensor data)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise WeightsFileError(f"{path} is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > HEADER_LIMIT:
                raise WeightsFileError(f"{path} claims a {length}-byte header; not a safetensors file")
            raw = handle.read(length)
    except OSError as error:
        raise WeightsFileError(f"cannot read {path}: {error}") from error
    if len(raw) != length:
        raise WeightsFileError(f"{path} ends inside its header (truncated)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path} has no JSON header ({error})") from error
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path} has a header that is not a JSON object")
    return {name: _entry(path, name, value) for name, value in header.items() if name != "__metadata__"}


def _entry(path: Path, name: str, value: Any) -> TensorInfo:
    try:
        dtype, shape = value["dtype"], tuple(int(n) for n in value["shape"])
    except (TypeError, KeyError, ValueError) as error:
        raise WeightsFileError(f"{path}: tensor {name!r} has no dtype and shape in the header") from error
    if dtype not in SAFETENSORS_BITS:
        raise WeightsFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    return TensorInfo(shape, SAFETENSORS_BITS[dtype], dtype.startswith(("F", "BF")))


def read_bin_tensors(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a torch ``.bin`` state dict, memory-mapped so no tensor data is read."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # zip, pickle and torch each raise their own types
        raise WeightsFileError(f"cannot read {path} ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} does not hold a state dict")
    return {
        str(name): TensorInfo(tuple(t.shape), t.dtype.itemsize * 8, t.dtype.is_floating_point)
        for name, t in state.items()
        if isinstance(t, torch.Tensor)
    }


def read_tensors(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one weights file, safetensors or ``.bin``."""
    return read_safetensors_header(path) if path.suffix == ".safetensors" else read_bin_tensors(path)


def loaded_bytes(tensors: Iterable[TensorInfo], float_dtype: torch.dtype) -> int:
    """Bytes these tensors take once loaded with floats in ``float_dtype``."""
    return sum(tensor.loaded_bytes(float_dtype) for tensor in tensors)


def weight_files(directory: Path, names: tuple[str, ...] = MODEL_FILES) -> list[Path]:
    """The weight files a loader reads from ``directory`` (a sharded index lists its shards)."""
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            return _shards(path)
        return [path]
    return []


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [index.parent / name for name in sorted(set(weight_map.values()))]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightsFileError(f"cannot read the shard index {index}: {error}") from error


def estimate_bytes(files: Iterable[Path], float_dtype: torch.dtype) -> int | None:
    """Bytes the tensors of ``files`` take once loaded; None when there are no files.

    A file whose header cannot be read counts at its size on disk (a rough answer beats none).
    """
    total, seen = 0, False
    for path in files:
        seen = True
        try:
            total += loaded_bytes(read_tensors(path).values(), float_dtype)
        except WeightsFileError:
            total += path.stat().st_size if path.is_file() else 0
    return total if seen else None


def module_bytes(module: torch.nn.Module, *, skip: Callable[[str], bool] | None = None) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers.

    Tied weights (an embedding shared with the output layer) share a storage and count once.
    ``skip`` leaves out tensors by qualified name (an adapter's, to measure its base alone).
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if tensor is None or (skip is not None and skip(name)):
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
