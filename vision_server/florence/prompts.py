"""Which task list a Florence-2 checkpoint offers (the lists live in :mod:`vision_server.tasks`)."""

from __future__ import annotations

from vision_server.tasks import FLORENCE_TASKS, PROMPTGEN_TASKS


def tasks_for_model(model_id: str) -> tuple[str, ...]:
    """PromptGen fine-tunes (and the built-in test models) get the PromptGen list."""
    lowered = model_id.lower()
    if "promptgen" in lowered or lowered.startswith("test:") or "florence" not in lowered:
        return PROMPTGEN_TASKS
    return FLORENCE_TASKS
