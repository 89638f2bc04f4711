"""The models an engine serves, each under the name requests pick it by."""

from __future__ import annotations

from dataclasses import dataclass

from vision_server.captioner import Captioner


@dataclass(frozen=True)
class NamedModel:
    """One served model: its name, its captioner and what sets it apart from the others.

    ``idle_timeout`` overrides the engine's for this model (None: the engine's). ``source`` and
    ``adapter`` are shown in ``/v1/models``; ``source`` defaults to the captioner's model id.
    """

    name: str
    captioner: Captioner
    idle_timeout: float | None = None
    source: str | None = None
    adapter: str | None = None

    @property
    def shown_source(self) -> str:
        return self.source if self.source is not None else self.captioner.model_id
