"""Moving a loaded model between its device and pinned host memory (the warm tier).

A GPU server that idles gives the GPU back; reloading from disk then costs seconds (more from a
cold page cache or a network disk). Parking the weights in pinned host memory instead frees the
GPU just the same, and moving them back is a host-to-device copy at PCIe speed. On a CPU the
weights already live in host memory, so there is nothing to win and the tier is skipped.

The mover is its own object so tests can stand in for CUDA (:class:`DeviceMover`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class DeviceMover(Protocol):
    def helps(self, device: torch.device) -> bool:
        """Whether parking a model from ``device`` in host memory frees anything."""
        ...

    def to_host(self, model: Any) -> None:
        """Move every weight and buffer of ``model`` to host memory; free the device's copy."""
        ...

    def to_device(self, model: Any, device: torch.device) -> None:
        """Move ``model`` back to ``device``, ready to run."""
        ...


class PinnedMover:
    """CUDA ↔ pinned (page-locked) host memory, so the way back is a fast DMA copy."""

    def helps(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def to_host(self, model: Any) -> None:
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.to("cpu").pin_memory()
        torch.cuda.empty_cache()

    def to_device(self, model: Any, device: torch.device) -> None:
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
