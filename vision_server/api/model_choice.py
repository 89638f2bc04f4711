"""Which served model a request names, read the same way by every API family.

The rule (``docs/api/index.md``, "Picking a model per request"):

- A caption request's model name is optional: absent or empty means the default model.
- **One model served: any name goes to it.** OpenAI-style clients always send some ``model``
  (SillyTavern sends ``gpt-4-turbo`` unless the user typed another), and a single-model server
  has always ignored it; it still does, so no existing client breaks.
- Several models served: a served name, or the source string of exactly one model (the hub id
  clients tend to send), picks that model; any other name is a 404 that lists the served names.
- Lookups that name a model (``/prompts?model=``, ``/v1/models/{id}``, the admin routes) never
  take the one-model shortcut: they need a served name (or a model's source) in either case,
  since a listing for a model the server does not have would be a lie.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.api.state import ENGINE, SETTINGS
from vision_server.engine.lifecycle import ModelCard, ModelStatus
from vision_server.images import PixelSpec
from vision_server.model_specs import public_model_id, public_source
from vision_server.train.metadata import adapter_summary

MODEL_PARAM = "model"


def model_field(value: object, param: str = MODEL_PARAM) -> str | None:
    """A request's ``model`` value: None when absent or empty, else the name; 400 when not text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameter(
            param, f"{param!r} must be a string naming a served model, not {shown(value)}."
        )
    return value.strip() or None


def resolve_exact(app: web.Application, name: str | None) -> str:
    """The served model ``name`` (or source) means (None: the default); 404 ``UnknownModel``
    for any other."""
    return app[ENGINE].resolve(name)


def resolve_for_caption(app: web.Application, name: str | None) -> str:
    """As :func:`resolve_exact`, but a server with one model takes any name (see above)."""
    engine = app[ENGINE]
    if len(engine.model_names) == 1:
        return engine.default_model
    return engine.resolve(name)


def chosen_model(request: web.Request, value: object, param: str = MODEL_PARAM) -> ModelCard:
    """The card of the model a caption request picked with ``value`` (its ``model``, unchecked)."""
    return request.app[ENGINE].card(resolve_for_caption(request.app, model_field(value, param)))


def looked_up_model(request: web.Request, param: str = MODEL_PARAM) -> ModelCard:
    """The card of the model a lookup names in its query string (``?model=NAME``; absent: the default)."""
    name = model_field(request.query.get(param), param)
    return request.app[ENGINE].card(resolve_exact(request.app, name))


def spec_for(app: web.Application, name: str | None) -> Callable[[], PixelSpec]:
    """The pixel spec of model ``name``, asked when the image is decoded (it may change on load)."""
    engine = app[ENGINE]
    return lambda: engine.pixel_spec_for(name)


def model_states(app: web.Application) -> dict[str, ModelStatus]:
    """Every served model's status (state, device, memory, last use) by name."""
    return {model.name: model for model in app[ENGINE].status().models}


def adapter_of(app: web.Application, card: ModelCard) -> str | None:
    """The model's adapter; for the default model also the configured one (a bare captioner
    served with ``--adapter``, as before several models, has none on its card)."""
    if card.adapter is not None or card.name != app[ENGINE].default_model:
        return card.adapter
    return app[SETTINGS].default_model_spec.adapter


def shown_model_id(card: ModelCard) -> str:
    """The model id a client is told: a hub id as it is, a local directory by its served name
    (:func:`~vision_server.model_specs.public_model_id`)."""
    return public_model_id(card.model_id, card.name or card.model_id)


def shown_status(app: web.Application, data: dict[str, Any], *, training: bool) -> None:
    """A status (``EngineStatus.as_dict()``) as clients see it, in place: no local path (each
    model's source by :func:`~vision_server.model_specs.public_source`; the default model is
    named by its served name already), each model's adapter by its folder name;
    with ``training``, also how the adapter was made (``training``:
    :func:`~vision_server.train.metadata.adapter_summary`, null without one)."""
    engine = app[ENGINE]
    for entry in data["models"]:
        summary = adapter_summary(adapter_of(app, engine.card(entry["name"])))
        entry["source"] = public_source(entry["source"])
        entry["adapter"] = None if summary is None else summary["name"]
        if training:
            entry["training"] = None if summary is None else summary["training"]
