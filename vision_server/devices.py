"""Where a torch model runs and how its memory comes back, shared by every model backend.

Florence-2, the generic transformers backends and the trainer all pick a device and a dtype the
same way, give memory back the same way after an unload or a burst, and turn a failed load into
one :class:`~vision_server.errors.ModelLoadError` whose message a client can act on.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from vision_server.errors import ModelLoadError, ModelSourceError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
T = TypeVar("T")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"Device {requested!r} was requested but CUDA is not available; use --device cpu."
        )
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA, float32 on CPU (CPU half precision is slow and lossy)."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def planned_placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype] | None:
    """Where a load with these settings will put the weights, known before loading; None when
    the load will fail anyway (a CUDA device on a machine without one)."""
    try:
        where = pick_device(device)
    except (ModelLoadError, RuntimeError):
        return None
    return where, pick_dtype(dtype, where)


def release_memory() -> None:
    """Give freed memory back: Python objects, the CUDA caching allocator, and glibc's heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Return the free pages of every glibc arena to the OS (``malloc_trim(0)``).

    glibc raises its mmap threshold after the first big free, so Pillow's 16 MB decode blocks
    and torch's CPU activations come from the heaps of the threads that made them, and free
    memory there is kept, not returned: RSS stays at a burst's peak until this runs. It walks
    all arenas (the decode threads' too) and costs milliseconds. A no-op without glibc.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_or_explain(model: str, load: Callable[[], T]) -> T:
    """Run ``load``; any failure becomes a :class:`ModelLoadError` naming ``model``, memory freed.

    Corrupt or mismatched files surface as many library-specific exception types; the engine
    and the client only need to know that the model could not be loaded, and why.
    """
    try:
        return load()
    except ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        release_memory()
        message = "Out of GPU memory while loading; free the GPU or use a smaller model."
        raise ModelLoadError(message) from None
    except ModelLoadError:
        raise
    except Exception as exc:
        release_memory()
        raise ModelLoadError(f"{model}: {type(exc).__name__}: {exc}") from None
