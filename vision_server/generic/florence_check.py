"""Whether ``--backend auto`` runs a model on the Florence-2 backend, from config.json alone.

Kept apart from :mod:`vision_server.generic.families` (whose families import torch) so that
``vision-server caption`` can learn a model's task list while planning (checking ``--task``, a
dry run, skipping what is done) without spending seconds importing torch and transformers.
"""

from __future__ import annotations

from typing import Any

from vision_server.generic.config_files import model_config

FLORENCE = "florence2"
FLORENCE_LABEL = "Florence-2 (Florence2ForConditionalGeneration, PromptGen)"
FLORENCE_TYPES = ("florence2",)


def names_florence(config: dict[str, Any]) -> bool:
    """True when a config's model_type or architectures are Florence-2's."""
    architectures = [str(name) for name in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    return model_type in FLORENCE_TYPES or any(name.startswith("Florence2") for name in architectures)


def auto_config(model: str, *, revision: str | None) -> dict[str, Any] | None:
    """The config.json ``--backend auto`` decides by: none is read for a name that says Florence,
    and None also when none can be had (then Florence-2, what the server always ran)."""
    if "florence" in model.lower():
        return None
    return model_config(model, revision=revision, fetch=True)


def auto_runs_florence(model: str, *, revision: str | None) -> bool:
    """Whether ``--backend auto`` picks Florence-2 for ``model`` (as ``detect_backend`` does)."""
    config = auto_config(model, revision=revision)
    return config is None or names_florence(config)
