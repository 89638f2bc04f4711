"""The contract between the engine and a model: what goes into a batch and what comes out.

The engine only ever talks to a :class:`Captioner`. The Florence-2 implementation lives in
:mod:`vision_server.florence.captioner`; :mod:`vision_server.testing.fake` has a fake one with a
controllable delay for scheduler tests. Captioners are synchronous and know nothing of asyncio:
the engine calls them from its one dedicated model thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from vision_server.images import PixelSpec, PreparedImage

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings. Jobs batch together only when these are equal (tasks may differ)."""

    max_new_tokens: int = 1024
    num_beams: int = 3
    temperature: float = 0.0  # 0 means greedy / beam search; > 0 samples
    top_p: float = 1.0
    min_new_tokens: int = 0  # benchmarks only: forces fixed-length captions from random weights
    with_confidence: bool = False  # also score the caption (one extra forward pass)
    # A client's limit in the caption's own tokens (OpenAI's max_tokens), within max_new_tokens:
    # the captioner adds the tokens its model forces (see for_generate). None: no such limit.
    caption_tokens: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def capped(self, tokens: int) -> GenerationOptions:
        """These options generating at most ``tokens`` tokens (themselves when already within)."""
        if self.max_new_tokens <= tokens:
            return self
        return dataclasses.replace(
            self, max_new_tokens=tokens, min_new_tokens=min(self.min_new_tokens, tokens)
        )

    def for_generate(self, forced: int) -> GenerationOptions:
        """These options as ``generate`` counts tokens, for a model that spends ``forced`` of them
        on fixed tokens (Florence-2 forces its start and end tokens): ``caption_tokens`` caption
        tokens plus those, never more than ``max_new_tokens``. ``max_tokens`` 1 would otherwise
        give Florence-2 an empty caption, and 3 one word."""
        if self.caption_tokens is None:
            return self
        return dataclasses.replace(self, caption_tokens=None).capped(self.caption_tokens + forced)

    @property
    def batch_key(self) -> GenerationOptions:
        """What must be equal for two items to share a generate call (scoring is per item)."""
        return dataclasses.replace(self, with_confidence=False) if self.with_confidence else self


@dataclass(frozen=True)
class CaptionItem:
    """One image to caption, already resized to the model's input size, with its task token.

    ``stream``, when set, is called from the model thread with the caption *so far* as tokens
    are generated (greedy and sampled decoding; beam search gives none). Each call extends the
    text of the one before; the final caption completes it. Captioners may ignore it.

    ``prompt`` is a client's free text for a model that takes one (:attr:`Captioner.takes_prompt`):
    a BLIP or GIT caption's first words, a chat VLM's question. Models without prompts ignore it.
    """

    image: PreparedImage
    task: str
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stream: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    prompt: str | None = None


@dataclass(frozen=True)
class Caption:
    """A captioner's answer for one item."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    confidence: float | None = None  # geometric mean of the chosen tokens' probabilities


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it runs (shown in /v1/status)."""

    model_id: str
    device: str
    dtype: str


@runtime_checkable
class Captioner(Protocol):
    """A model that can be loaded, asked for captions in batches, and unloaded."""

    @property
    def model_id(self) -> str:
        """The configured model name (hub id or directory), known before loading."""
        ...

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task tokens this model understands, in display order, known before loading."""
        ...

    @property
    def takes_prompt(self) -> bool:
        """Whether free text reaches the model (:attr:`CaptionItem.prompt`), known before loading.

        False for Florence-2, whose prompts are its task tokens: free text only picks a task.
        """
        ...

    @property
    def preferred_batch_size(self) -> int:
        """The batch size to use when the operator sets none (it depends on the device)."""
        ...

    @property
    def pixel_spec(self) -> PixelSpec:
        """The input size and normalisation images are prepared for, known before loading.

        Read on decode threads; a model that turns out to want another size once loaded must
        still accept items prepared for the earlier answer.
        """
        ...

    def load(self) -> ModelInfo:
        """Load weights; raise :class:`vision_server.errors.ModelLoadError` with a clear reason."""
        ...

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        """Caption every item; one result per item, in order."""
        ...

    def unload(self) -> None:
        """Drop every reference to the model and return its memory."""
        ...

    def trim_memory(self) -> None:
        """Hand memory that finished batches (and image decodes) freed back to the OS.

        Called from the model thread once a burst is over, with the model still loaded: the
        allocator keeps what a burst freed for reuse otherwise, so RSS would stay at its peak.
        """
        ...


def model_family(captioner: Captioner) -> str:
    """The model's architecture as clients see it (multipart's ``model_type``): ``florence-2``
    unless the captioner names another in a ``family`` attribute (BLIP, GIT, ...)."""
    return str(getattr(captioner, "family", "florence-2"))


def token_limit(captioner: Captioner) -> int | None:
    """The most tokens the model can generate for a caption, before any prompt takes its share
    (its text decoder's positions); None when unknown or unlimited. Captioners that know theirs
    say so in a ``max_new_tokens_limit`` attribute, cheap to read once known."""
    limit = getattr(captioner, "max_new_tokens_limit", None)
    return limit if isinstance(limit, int) else None


@runtime_checkable
class Offloadable(Protocol):
    """A captioner with a warm tier: weights parked in (pinned) host memory, device memory free.

    Moving them back is much faster than a load from disk. The engine uses the tier between
    the idle timeout and the offload timeout, when :attr:`can_offload` says it helps.
    """

    @property
    def can_offload(self) -> bool:
        """True when the loaded model sits on a device whose memory the tier frees (a GPU)."""
        ...

    def offload(self) -> None:
        """Move the loaded weights to host memory and release the device's memory."""
        ...

    def restore(self) -> ModelInfo:
        """Move offloaded weights back to the device; ready to caption again."""
        ...


@runtime_checkable
class MemoryAware(Protocol):
    """A captioner that says how much memory its weights take, for ``--memory-budget``."""

    def memory_parts(self) -> dict[str, int]:
        """Bytes of device memory (RAM on the CPU) per block of weights this model holds.

        Keys name the blocks so that captioners sharing one (a base model under two adapters)
        report it under the same key, and the engine counts it once. Before the first load an
        estimate (from the weight files' headers; empty when unknown), afterwards what the loaded
        weights measure. Read on the event loop: must be cheap once the first answer is known.
        """
        ...
