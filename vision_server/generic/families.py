"""Which family a model belongs to, from its ``config.json`` alone (read before any weights load)."""

from __future__ import annotations

from typing import Any

from vision_server.generic.blip import Blip
from vision_server.generic.encoder_decoder import VisionEncoderDecoder
from vision_server.generic.family import Family
from vision_server.generic.florence_check import FLORENCE, FLORENCE_LABEL, auto_config, names_florence
from vision_server.generic.git import Git
from vision_server.generic.idefics3 import Idefics3

FAMILIES: dict[str, Family] = {
    family.name: family for family in (Blip(), Git(), VisionEncoderDecoder(), Idefics3())
}


def supported() -> str:
    """Every architecture the server runs, for error messages."""
    return "; ".join([FLORENCE_LABEL, *(family.label for family in FAMILIES.values())])


def backend_of(config: dict[str, Any]) -> str | None:
    """The backend name for a model's config (architectures first, then model_type); None if unknown.

    A listed architecture that no family runs (``BlipForQuestionAnswering``) is unknown even if
    its model_type is known: the same weights file would load into the wrong head.
    """
    if names_florence(config):
        return FLORENCE
    architectures = [str(name) for name in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    for family in FAMILIES.values():
        if architectures:
            if any(name in family.architectures for name in architectures):
                return family.name
        elif model_type in family.model_types:
            return family.name
    return None


def describe(config: dict[str, Any]) -> str:
    """How a config names its model, for messages: architectures and model_type."""
    architectures = ", ".join(str(name) for name in config.get("architectures") or []) or "none listed"
    return f"architectures {architectures}, model_type {config.get('model_type', 'unset')!r}"


def detect_backend(model: str, *, revision: str | None) -> str | None:
    """``--backend auto``: the backend ``model``'s config names; None for an architecture no
    backend runs (its load then fails with the list of supported ones).

    Florence-2 when nothing can be read (a test model, or a hub id neither cached nor reachable):
    that is what the server always ran, and its load error explains how to get the files.
    """
    config = auto_config(model, revision=revision)
    if config is None:
        return FLORENCE
    return backend_of(config)
