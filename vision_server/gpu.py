"""GPU memory as this process sees it, read without importing torch or creating a CUDA context.

A CUDA context costs hundreds of MB of GPU memory, so probes and metrics must never be the thing
that creates one: before the model first runs on a GPU they report the GPU as present with no
memory used, and the device size as unknown.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one CUDA device: held by live tensors, held by the caching allocator, and in total."""

    device: str
    allocated: int
    reserved: int
    total: int | None


def gpu_available() -> bool:
    """True when torch is loaded and sees a CUDA device (False on servers that never import torch)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except (AttributeError, RuntimeError):  # torch half-imported, or a broken driver
        return False


def gpu_memory() -> list[DeviceMemory]:
    """One entry per CUDA device; empty when there is no GPU."""
    if not gpu_available():
        return []
    import torch

    count = torch.cuda.device_count()
    if not torch.cuda.is_initialized():
        return [DeviceMemory(f"cuda:{index}", 0, 0, None) for index in range(count)]
    return [
        DeviceMemory(
            f"cuda:{index}",
            torch.cuda.memory_allocated(index),
            torch.cuda.memory_reserved(index),
            torch.cuda.get_device_properties(index).total_memory,
        )
        for index in range(count)
    ]
