"""Memory arithmetic for ``--memory-budget``: what the loaded models take and whom to evict.

Weights are counted per block (:meth:`vision_server.captioner.MemoryAware.memory_parts`), so a base
model shared by two adapters is counted once, and evicting one of them frees only its adapter.
Pure functions over plain mappings, so the eviction rule is tested without any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vision_server.captioner import Captioner, MemoryAware

Parts = Mapping[str, int]


def memory_parts(captioner: Captioner) -> dict[str, int]:
    """What ``captioner`` says its weights take; empty (unknown) for captioners that cannot say."""
    if isinstance(captioner, MemoryAware):
        return dict(captioner.memory_parts())
    return {}


def footprint(holders: Iterable[Parts]) -> int:
    """Bytes taken by the union of the holders' blocks (a shared block counts once)."""
    blocks: dict[str, int] = {}
    for parts in holders:
        blocks.update(parts)
    return sum(blocks.values())


@dataclass(frozen=True)
class Resident:
    """A model whose weights are in memory now, under the name the engine knows it by."""

    name: str
    parts: Parts


def plan_evictions(
    wanted: Parts, resident: Sequence[Resident], evictable: Sequence[str], budget: int
) -> list[str] | None:
    """The models to unload, in ``evictable``'s order (least recently used first), so that
    ``wanted`` fits beside the rest within ``budget``; None when it cannot fit even then.

    A candidate whose unloading frees nothing ``wanted`` does not itself need (its blocks are
    shared with a model that stays, or with ``wanted``) is skipped: evicting it would only cost
    a reload.
    """
    kept = list(resident)

    def total(models: Sequence[Resident]) -> int:
        return footprint([*(model.parts for model in models), wanted])

    if total(kept) <= budget:
        return []
    victims: list[str] = []
    for name in evictable:
        trial = [model for model in kept if model.name != name]
        if total(trial) < total(kept):
            kept = trial
            victims.append(name)
            if total(kept) <= budget:
                return victims
    return None
