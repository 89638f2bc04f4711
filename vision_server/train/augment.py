"""Caption augmentation for comma-separated tag captions: shuffle the tags, drop one now and then.

Each caption's randomness comes from its own generator, seeded by (seed, epoch, position), so a
resumed run draws exactly what the uninterrupted one would have, with no state to save.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Augmentation:
    shuffle_tags: bool = False
    keep_tokens: int = 0  # the first N parts (a trigger word, say) stay in front, in order
    caption_dropout: float = 0.0  # probability of dropping one (not kept) part

    @property
    def active(self) -> bool:
        return self.shuffle_tags or self.caption_dropout > 0

    def apply(self, text: str, rng: random.Random) -> str:
        if not self.active:
            return text
        parts = [part.strip() for part in text.split(",")]
        parts = [part for part in parts if part]
        kept, rest = parts[: self.keep_tokens], parts[self.keep_tokens :]
        if self.shuffle_tags:
            rng.shuffle(rest)
        if self.caption_dropout > 0 and len(rest) > 1 and rng.random() < self.caption_dropout:
            del rest[rng.randrange(len(rest))]
        return ", ".join(kept + rest)


def caption_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The generator for the caption at ``position`` of ``epoch``'s order (str seeds are stable)."""
    return random.Random(f"{seed}:{epoch}:{position}")
