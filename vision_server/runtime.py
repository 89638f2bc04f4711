"""Building the captioners and the engine from :class:`Settings`, for the server and offline runs.

Kept apart from :mod:`vision_server.app` so the offline dataset captioner uses exactly the same
model and engine setup without importing the HTTP stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vision_server.captioner import Captioner
from vision_server.engine.models import NamedModel
from vision_server.engine.scheduler import EngineConfig
from vision_server.model_specs import ModelSpec
from vision_server.settings import Settings, SettingsError

if TYPE_CHECKING:
    from vision_server.florence.shared_base import SharedBases


def check_cache_dir(settings: Settings) -> None:
    """Make the cache dir, or refuse with where it was set: a place that cannot exist (a typo, a
    path under a file, a read-only system) otherwise surfaced only at the first model load, as
    a bare ``FileNotFoundError`` from deep in a conversion. An existing read-only cache dir passes
    (models converted into it before still load)."""
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is a file" if settings.cache_dir.is_file() else exc.strerror or str(exc)
        raise SettingsError(
            f"cache_dir {settings.cache_dir}: cannot be made ({reason})", setting="cache_dir"
        ) from None


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
        memory_budget=settings.memory_budget_bytes,
    )


def build_models(settings: Settings) -> list[NamedModel]:
    """One captioner per configured model, named as requests pick it, in the configured order.

    Nothing loads here (captioners load on first use); each model loads with its own revision and
    backend (``--revision`` / ``--backend`` as VALUE or NAME:VALUE; ``auto`` reads the backend from
    the model's own config). Raises :class:`SettingsError` for
    a missing adapter directory or an adapter on a backend that takes none. Florence-2 models
    that differ only by adapter share one copy of their base (one pool for the whole server).
    """
    from vision_server.florence.shared_base import SharedBases

    bases = SharedBases()
    return [
        NamedModel(
            spec.name,
            build_captioner(settings, spec, bases=bases),
            idle_timeout=spec.idle_timeout,
            source=spec.source,
            adapter=spec.adapter,
        )
        for spec in settings.model_specs
    ]


def build_captioner(
    settings: Settings, spec: ModelSpec | None = None, *, bases: SharedBases | None = None
) -> Captioner:
    """The captioner for ``spec`` (default: the default model) on the spec's backend (imported
    lazily: torch).

    ``auto`` reads the model's config.json (see :func:`vision_server.generic.families.detect_backend`).
    """
    from vision_server.generic.families import detect_backend
    from vision_server.generic.florence_check import FLORENCE

    spec = spec if spec is not None else settings.default_model_spec
    check_adapter(settings, spec)
    backend: str | None = spec.backend
    if backend == "auto":
        backend = detect_backend(spec.source, revision=spec.revision)
    if backend == FLORENCE:
        from vision_server.florence.captioner import FlorenceCaptioner

        return FlorenceCaptioner.from_settings(settings, spec, bases=bases)
    if spec.adapter is not None:
        raise SettingsError(
            f"model {spec.name}: adapters work on Florence-2 models only; {spec.source} runs on the "
            f"{backend or 'generic'} backend, so drop '+{spec.adapter}'",
            setting=adapter_setting(settings),
        )
    from vision_server.generic.captioner import GenericCaptioner

    return GenericCaptioner.from_settings(settings, backend, spec)


def model_tasks(settings: Settings, spec: ModelSpec) -> tuple[str, ...]:
    """The tasks ``build_captioner(settings, spec).tasks`` offers, without importing torch.

    Planning a bulk run (checking ``--task``, a dry run, skipping what is done) needs only the
    list, which the backend decides: a Florence-2 checkpoint's depends on its name, every other
    backend offers a plain caption. Raises the :class:`SettingsError` that ``build_captioner``
    would for a bad adapter.
    """
    from vision_server.florence.prompts import tasks_for_model
    from vision_server.generic.florence_check import FLORENCE, auto_runs_florence
    from vision_server.tasks import CAPTION_TASK

    check_adapter(settings, spec)
    if spec.backend == "auto":
        florence = auto_runs_florence(spec.source, revision=spec.revision)
    else:
        florence = spec.backend == FLORENCE
    if florence:
        return tasks_for_model(spec.source)
    if spec.adapter is not None:  # refused, naming the backend: only a failing run imports torch
        build_captioner(settings, spec)
    return (CAPTION_TASK,)


def check_adapter(settings: Settings, spec: ModelSpec) -> None:
    """Refuse a model whose adapter directory is no PEFT adapter, naming where it was set."""
    problem = adapter_problem(Path(spec.adapter).expanduser()) if spec.adapter is not None else None
    if problem:
        raise SettingsError(f"model {spec.name}: {problem}", setting=adapter_setting(settings))


def adapter_setting(settings: Settings) -> str:
    """The setting that gave a model its adapter, so its error says where that was set: ``adapter``
    (``--adapter DIR``), or ``model`` (``--model NAME=SOURCE+DIR``)."""
    return "adapter" if settings.adapter is not None else "model"


def adapter_problem(directory: Path) -> str | None:
    """Why ``directory`` is no PEFT adapter, found at start (the model loads only on first use).

    A ``vision-server train`` output folder whose run was stopped has checkpoints but no adapter
    yet: the message says how to finish it, or which checkpoint (itself an adapter) to use.
    """
    if not directory.exists():
        return f"the adapter directory {directory} does not exist"
    if not directory.is_dir():
        return f"the adapter {directory} is a file; name the folder that holds adapter_config.json"
    if not (directory / "adapter_config.json").is_file():
        checkpoints = sorted(directory.glob("checkpoints/step-*/adapter_config.json"))
        if checkpoints:
            return (
                f"{directory} is a training run that has not finished (no adapter yet): finish it with "
                f"vision-server train ... --resume {directory}, or use its newest checkpoint "
                f"{checkpoints[-1].parent}"
            )
        return f"the adapter directory {directory} has no adapter_config.json, so it is not a PEFT adapter"
    if not any((directory / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        return f"the adapter directory {directory} has no adapter_model.safetensors or adapter_model.bin"
    return None
