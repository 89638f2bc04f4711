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

from vision_server.errors import ModelLoadError, ModelSourceError, OutOfMemory

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
    except ModelLoadError:
        raise
    except torch.cuda.OutOfMemoryError:
        message = "Out of GPU memory while loading; free the GPU or use a smaller model."
    except Exception as exc:
        message = f"{model}: {type(exc).__name__}: {exc}"
    # Outside the handler (see generate_or_out_of_memory): the failed load's frames, and the
    # weights already on the GPU that they hold, are gone before the memory is released.
    release_memory()
    raise ModelLoadError(message)


def generate_or_out_of_memory(generate: Callable[[], T], batch_size: int) -> T:
    """Run one batch's generation; a CUDA out-of-memory becomes :class:`OutOfMemory`, its memory free.

    The CUDA error's traceback holds every frame of the failed call, and through them the
    activations and cache it had allocated: while that exception lives (also as the implicit
    ``__context__`` of an error raised inside its handler) the memory stays allocated, and the
    engine's retry in halves runs out of memory again (pytorch/pytorch#18853). So the handler
    only notes the failure; memory is released and the new error raised after it, with no context.
    ``generate`` should build the batch's tensors itself, so that they go with its frame.
    """
    try:
        return generate()
    except torch.cuda.OutOfMemoryError:
        pass
    release_memory()
    raise OutOfMemory(f"Out of GPU memory on a batch of {batch_size}.", retry_after=5)
