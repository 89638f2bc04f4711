"""Which served model a request names, read the same way by every API family.

The rule (``docs/api.md``, "Picking a model per request"):

- A caption request's model name is optional: absent or empty means the default model.
- **One model served: any name goes to it.** OpenAI-style clients always send some ``model``
  (SillyTavern sends ``gpt-4-turbo`` unless the user typed another), and a single-model server
  has always ignored it; it still does, so no existing client breaks.
- Several models served: a served name, or the source string of exactly one model (the hub id
  clients tend to send), picks that model; any other name is a 404 that lists the served names.
- Lookups that name a model (``/prompts?model=``, ``/v1/models/{id}``, the admin routes) are
  exact in either case: a listing for a model the server does not have would be a lie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.api.state import ENGINE, FREE_TEXT, MODEL_FAMILY
from vision_server.errors import UnknownModel
from vision_server.images import PixelSpec

MODEL_PARAM = "model"


@dataclass(frozen=True)
class ChosenModel:
    """What a handler needs of the model a request picked."""

    name: str  # the name the engine serves it under
    model_id: str
    tasks: tuple[str, ...]
    family: str  # the architecture as clients see it (multipart's ``model_type``)
    takes_prompt: bool  # whether free text reaches the model (else it picks a task)


def model_field(value: object, param: str = MODEL_PARAM) -> str | None:
    """A request's ``model`` value: None when absent or empty, else the name; 400 when not text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameter(
            param, f"{param!r} must be a string naming a served model, not {shown(value)}."
        )
    return value.strip() or None


def served_names(app: web.Application) -> tuple[str, ...]:
    return (app[ENGINE].model_card.model_id,)


def unknown_model(app: web.Application, name: str) -> UnknownModel:
    names = ", ".join(map(repr, served_names(app)))
    return UnknownModel(f"The model {name!r} is not served here; this server has {names}.")


def resolve_exact(app: web.Application, name: str | None) -> str:
    """The served model ``name`` means (None: the default); 404 for any other name."""
    names = served_names(app)
    if name is None:
        return names[0]
    if name not in names:
        raise unknown_model(app, name)
    return name


def resolve_for_caption(app: web.Application, name: str | None) -> str:
    """As :func:`resolve_exact`, but a server with one model takes any name (see above)."""
    names = served_names(app)
    if len(names) == 1:
        return names[0]
    return resolve_exact(app, name)


def card_of(app: web.Application, name: str) -> ChosenModel:
    card = app[ENGINE].model_card
    return ChosenModel(name, card.model_id, card.tasks, app[MODEL_FAMILY], app[FREE_TEXT])


def chosen_model(request: web.Request, value: object, param: str = MODEL_PARAM) -> ChosenModel:
    """The model a caption request picked with ``value`` (its ``model`` field, unchecked)."""
    return card_of(request.app, resolve_for_caption(request.app, model_field(value, param)))


def looked_up_model(request: web.Request, param: str = MODEL_PARAM) -> ChosenModel:
    """The model a lookup names in its query string (``?model=NAME``; absent: the default)."""
    name = model_field(request.query.get(param), param)
    return card_of(request.app, resolve_exact(request.app, name))


def spec_for(app: web.Application, name: str | None) -> Callable[[], PixelSpec]:
    """The pixel spec of model ``name``, asked when the image is decoded (it may change on load)."""
    engine = app[ENGINE]
    return lambda: engine.pixel_spec
