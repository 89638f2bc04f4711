"""Building the captioner and the engine from :class:`Settings`, for the server and offline runs.

Kept apart from :mod:`vision_server.app` so the offline dataset captioner uses exactly the same
model and engine setup without importing the HTTP stack.
"""

from __future__ import annotations

from vision_server.captioner import Captioner
from vision_server.engine.scheduler import EngineConfig
from vision_server.settings import Settings


def engine_config(settings: Settings, captioner: Captioner) -> EngineConfig:
    return EngineConfig(
        max_queue=settings.max_queue,
        max_batch_size=settings.max_batch_size or captioner.preferred_batch_size,
        max_batch_wait=settings.max_batch_wait,
        idle_timeout=settings.idle_timeout,
        request_timeout=settings.request_timeout,
        bulk_aging=settings.bulk_aging,
        max_keep_alive=settings.max_keep_alive,
        offload_timeout=settings.offload_timeout,
    )


def build_captioner(settings: Settings) -> Captioner:
    """The captioner for ``settings.model`` and ``settings.backend`` (imported lazily: torch).

    ``auto`` reads the model's config.json (see :func:`vision_server.generic.families.detect_backend`).
    """
    from vision_server.generic.families import FLORENCE, detect_backend

    backend: str | None = settings.backend
    if backend == "auto":
        backend = detect_backend(settings.model, revision=settings.revision)
    if backend == FLORENCE:
        from vision_server.florence.captioner import FlorenceCaptioner

        return FlorenceCaptioner.from_settings(settings)
    from vision_server.generic.captioner import GenericCaptioner

    return GenericCaptioner.from_settings(settings, backend)
