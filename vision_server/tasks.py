"""Task tokens: the caption kinds a model may offer and how user spellings map onto them.

Model-agnostic on purpose: the API adapters read and check tasks without importing the model
layer. Which list a given checkpoint offers is the model layer's call (``Captioner.tasks``).
"""

from __future__ import annotations

from vision_server.errors import InvalidTask

PROMPTGEN_TASKS: tuple[str, ...] = (
    "<GENERATE_TAGS>",
    "<CAPTION>",
    "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>",
    "<ANALYZE>",
    "<MIXED_CAPTION>",
    "<MIXED_CAPTION_PLUS>",
)

# The caption-style tasks of Microsoft's base Florence-2 checkpoints. Region and box tasks need
# extra inputs or return coordinates, which no API family here can carry, so they are left out.
FLORENCE_TASKS: tuple[str, ...] = (
    "<CAPTION>",
    "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>",
    "<OCR>",
)

# The one task of models that are not Florence-2 (BLIP, GIT, ...): a plain caption. Those that
# take a prompt get free text beside it (:attr:`vision_server.captioner.CaptionItem.prompt`).
CAPTION_TASK = "<CAPTION>"

# The model author's own ComfyUI node sends these spellings.
ALIASES: dict[str, str] = {
    "<MIX_CAPTION>": "<MIXED_CAPTION>",
    "<MIX_CAPTION_PLUS>": "<MIXED_CAPTION_PLUS>",
}


def normalize_task(raw: str, valid: tuple[str, ...]) -> str:
    """Map ``caption``, ``<Caption>`` or ``MIX_CAPTION`` to a canonical token from ``valid``."""
    token = raw.strip().upper()
    if not token.startswith("<"):
        token = f"<{token}>"
    token = ALIASES.get(token, token)
    if token not in valid:
        shown = raw if len(raw) <= 100 else f"{raw[:100]}..."  # never echo a megabyte back
        raise InvalidTask(f"Invalid prompt {shown!r}. Valid prompts: {', '.join(valid)}")
    return token
