"""A batch-aware token streamer: each row's new tokens go to its own request, mid-batch.

``generate`` hands a streamer the whole batch's next tokens at every step (one per row). This
one keeps each row's tokens, decodes the rows whose item wants a stream, and calls the item's
``stream`` with that row's caption *so far*. It runs in the model thread and knows nothing of
asyncio or HTTP; the callback is the caller's business (the OpenAI adapter hops to the loop).

What it hands out is only ever extended, never taken back: text that could still change is held
back (trailing whitespace, which the final caption strips, and a half-decoded character at the
end), so the streamed pieces add up to the final caption. Beam search cannot stream (the best
beam is known only at the end); :func:`wants_stream` says when a group streams at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from vision_server.captioner import CaptionItem, GenerationOptions

PURE_TEXT = "pure_text"


def wants_stream(processor: Any, items: list[CaptionItem], options: GenerationOptions) -> bool:
    """True when some item asks for a stream and the group can give one (one beam, text tasks)."""
    return options.num_beams == 1 and any(streams(processor, item) for item in items)


def streams(processor: Any, item: CaptionItem) -> bool:
    """Whether ``item`` is streamed: it asks, and its task's answer is plain text (not boxes)."""
    kinds = getattr(processor, "tasks_answer_post_processing_type", {})
    return item.stream is not None and kinds.get(item.task, PURE_TEXT) == PURE_TEXT


class RowStreamer(BaseStreamer):
    """Routes each row's tokens to its item's ``stream`` (rows past ``len(sinks)`` are padding)."""

    def __init__(self, tokenizer: Any, sinks: list[Callable[[str], None] | None]) -> None:
        self.tokenizer = tokenizer
        self.sinks = sinks
        self.tokens: list[list[int]] = [[] for _ in sinks]
        self.sent = ["" for _ in sinks]
        self.finished = [sink is None for sink in sinks]
        self.special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call carries the decoder's start tokens, not new ones
            self.started = True
            return
        step = value.reshape(value.shape[0], -1)[:, -1].tolist()
        for row, sink in enumerate(self.sinks):
            if self.finished[row] or sink is None:
                continue
            token = int(step[row])
            if token == self.tokenizer.eos_token_id:
                self.finished[row] = True
                continue
            if token in self.special:
                continue
            self.tokens[row].append(token)
            text = stable_prefix(self.tokenizer.decode(self.tokens[row], skip_special_tokens=True))
            if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
                self.sent[row] = text
                sink(text)

    def end(self) -> None:
        """Nothing to flush: the final caption itself completes each stream."""


def stable_prefix(text: str) -> str:
    """The part of a partial caption that later tokens cannot change in the final caption."""
    text = text.lstrip()
    if text.endswith("\ufffd"):  # a multi-byte character cut in half by a byte-level token
        text = text.rstrip("\ufffd")
    return text.rstrip()
