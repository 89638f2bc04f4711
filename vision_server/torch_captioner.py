"""What every torch captioner shares: load once, unload completely, the warm tier, memory parts.

Florence-2 (:mod:`vision_server.florence.captioner`) and the generic transformers backends
(:mod:`vision_server.generic.captioner`) differ in how they load and caption; holding the
loaded weights, parking them in host memory and saying how much memory they take is the same
for both, so it lives here once. A subclass says how to load (``_load``), which module holds
the weights (``_module``), and how big they are before loading (``_estimated_size``).
"""

from __future__ import annotations

import itertools
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from vision_server.captioner import GenerationOptions, ModelInfo
from vision_server.devices import load_or_explain, planned_placement, release_memory, trim_heap
from vision_server.florence.footprint import source_label
from vision_server.florence.tiers import DeviceMover, PinnedMover

_SERIALS = itertools.count(1)  # tells apart private copies of one model in memory_parts keys


class Placed(Protocol):
    """A loaded model: whatever the backend keeps, with where it runs."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


H = TypeVar("H", bound=Placed)


class TorchCaptioner(Generic[H]):
    """The lifecycle half of a :class:`~vision_server.captioner.Captioner` (plus ``Offloadable``
    and ``MemoryAware``) for a model held as ``H`` while loaded."""

    def __init__(
        self,
        model: str,
        *,
        cache_dir: Path,
        revision: str | None,
        device: str,
        dtype: str,
        mover: DeviceMover | None,
    ) -> None:
        self._spec = model
        self.cache_dir = cache_dir
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.mover: DeviceMover = mover or PinnedMover()
        self._loaded: H | None = None
        self._offloaded = False  # the loaded weights sit in host memory (the warm tier)
        self._serial = next(_SERIALS)
        self._own_size: int | None = None  # measured bytes of a private copy, kept across unloads

    @property
    def model_id(self) -> str:
        return self._spec

    @property
    def preferred_batch_size(self) -> int:
        """Uncompiled decoding is launch-bound on a GPU (a batch of 64 costs about what 1 does),
        while a CPU's cost grows with the batch; so batch wide on CUDA and moderately on CPU."""
        wants_cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        return 32 if wants_cuda else 16

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    # --- load / unload -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        if self._loaded is None:
            self._loaded = load_or_explain(self._spec, self._load)
        return self._info(self._loaded)

    def _info(self, held: H) -> ModelInfo:
        return ModelInfo(self._spec, str(held.device), str(held.dtype).removeprefix("torch."))

    def _load(self) -> H:
        raise NotImplementedError

    def _module(self, held: H) -> Any:
        """The module whose weights the warm tier moves."""
        raise NotImplementedError

    def unload(self) -> None:
        """Drop every reference to the model and return its memory."""
        held, self._loaded = self._loaded, None
        self._offloaded = False
        if held is not None:
            self._release(held)
        del held
        release_memory()

    def _release(self, held: H) -> None:
        """What else an unload lets go of (a shared base's hold); nothing by default."""

    def _ready(self) -> H:
        """The loaded model, for a batch."""
        held = self._loaded
        if held is None or self._offloaded:
            raise RuntimeError("caption() called before load(), or while offloaded")
        return held

    def trim_memory(self) -> None:
        """After a burst: the host heap only (the CUDA cache stays, it is reused by the next one)."""
        trim_heap()

    # --- the warm tier (vision_server.captioner.Offloadable) -------------------------------------

    @property
    def can_offload(self) -> bool:
        """On a device whose memory the tier frees (a GPU), when the model allows it."""
        held = self._loaded
        return held is not None and self.mover.helps(held.device) and self._may_park(held)

    def _may_park(self, held: H) -> bool:
        return True

    def offload(self) -> None:
        held = self._loaded
        if held is None or self._offloaded or not self._park(held):
            return
        self._offloaded = True
        release_memory()

    def _park(self, held: H) -> bool:
        """Move the weights to host memory; False when they must stay where they are."""
        self.mover.to_host(self._module(held))
        return True

    def restore(self) -> ModelInfo:
        held = self._loaded
        if held is None:
            raise RuntimeError("restore() called with no model in host memory")
        if self._offloaded:
            self._unpark(held)
            self._offloaded = False
        return self._info(held)

    def _unpark(self, held: H) -> None:
        self.mover.to_device(self._module(held), held.device)

    # --- memory (vision_server.captioner.MemoryAware) ---------------------------------------------

    def memory_parts(self) -> dict[str, int]:
        """One private block: the weights' bytes, from the files' headers until measured loaded."""
        return self._private_parts()

    def _private_parts(self, suffix: str = "") -> dict[str, int]:
        """A copy no other captioner uses, under a key of its own (``suffix`` names an adapter)."""
        label = self._placement_label
        size = self._own_size if self._own_size is not None else self._estimated_size
        return {} if label is None or size is None else {f"model:{label}{suffix}#{self._serial}": size}

    @cached_property
    def _placement(self) -> tuple[torch.device, torch.dtype] | None:
        """Where a load will put the weights; None when it is bound to fail (no CUDA)."""
        return planned_placement(self.device, self.dtype)

    @cached_property
    def _placement_label(self) -> str | None:
        """``source@revision:device:dtype``: which weights, where."""
        if self._placement is None:
            return None
        device, dtype = self._placement
        kind = str(dtype).removeprefix("torch.")
        return f"{source_label(self._spec)}@{self.revision or 'main'}:{device}:{kind}"

    @cached_property
    def _estimated_size(self) -> int | None:
        """Bytes from the files on disk before the first load; None when unknown."""
        return None


# transformers' own example of a temperature 'close to 0' (greedy in effect)
MIN_SAMPLING_TEMPERATURE = 1e-4


def forced_tokens(model: Any) -> int:
    """How many of ``generate``'s new tokens ``model`` spends on tokens its generation config
    forces (Florence-2: the start token first, the end token at the length limit), so that a
    limit in caption tokens can be turned into one that ``generate`` counts."""
    config = getattr(model, "generation_config", None)
    names = ("forced_bos_token_id", "forced_eos_token_id")
    return sum(1 for name in names if getattr(config, name, None) is not None)


def generate_kwargs(options: GenerationOptions) -> dict[str, Any]:
    """``generate``'s keyword arguments for ``options``: sampling knobs only when sampling.

    A temperature between 0 and :data:`MIN_SAMPLING_TEMPERATURE` samples at that floor: the
    scores are float32, so dividing them by ``1e-40`` (which a client may send: it is > 0) gives
    infinities, and ``generate`` fails the whole batch on the NaNs that follow. At the floor,
    sampling already picks the likeliest token every time, as any smaller temperature would."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "num_beams": options.num_beams,
        "do_sample": options.do_sample,
    }
    if options.do_sample:
        temperature = max(options.temperature, MIN_SAMPLING_TEMPERATURE)
        kwargs.update(temperature=temperature, top_p=options.top_p)
    if options.min_new_tokens:
        kwargs["min_new_tokens"] = options.min_new_tokens
    return kwargs
