"""The plan for compiled decoding: fixed shapes so ``torch.compile`` never recompiles mid-service.

A static KV cache plus ``torch.compile`` cuts per-token cost about 5× on an H100 (reference
§10), but every new batch size or prompt length is a new shape and costs a 10–25 s compile.
So compiled batches are padded up to a few bucket sizes, prompts to one length, and every
bucket is compiled once right after load.
"""

from __future__ import annotations

from dataclasses import dataclass

from vision_server.captioner import CaptionItem, GenerationOptions

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROMPT_TEXT_TOKENS = 48  # longer than every task prompt; the image tokens come on top


@dataclass(frozen=True)
class CompilePlan:
    """Which batches run compiled: these options, padded to one of these batch sizes."""

    options: GenerationOptions
    buckets: tuple[int, ...]
    prompt_length: int

    @classmethod
    def create(
        cls,
        options: GenerationOptions,
        max_batch_size: int,
        image_tokens: int,
        buckets: tuple[int, ...] | None = None,
    ) -> CompilePlan:
        """``buckets`` replaces the default sizes (benchmarks compile only the sizes they time)."""
        if buckets:
            sizes = tuple(sorted(set(buckets)))
        else:
            sizes = (*(b for b in BUCKETS if b < max_batch_size), max_batch_size)
        return cls(options.batch_key, sizes, image_tokens + PROMPT_TEXT_TOKENS)

    def accepts(self, options: GenerationOptions, size: int) -> bool:
        """Other options (a client's max_tokens, sampling) run uncompiled rather than recompile."""
        return options.batch_key == self.options and size <= self.buckets[-1]

    def bucket_for(self, size: int) -> int:
        return next(bucket for bucket in self.buckets if bucket >= size)

    def pad(self, items: list[CaptionItem]) -> list[CaptionItem]:
        """Repeat the last item up to the bucket size; the extra answers are thrown away."""
        return items + [items[-1]] * (self.bucket_for(len(items)) - len(items))
