"""OpenAI-compatible chat completions, so OpenAI SDKs, SillyTavern and ComfyUI nodes can caption.

``POST /v1/chat/completions`` (also ``/chat/completions``: SillyTavern's Custom source and
FloCap users point at a base URL without ``/v1``) and ``GET /v1/models`` (also ``/models``).

What a request means here:

- The images are those of the last user message that has any, as ``image_url`` parts whose
  ``url`` is a ``data:`` URL (or bare base64); ``image_url`` may be an object or a plain string.
  Several images are captioned separately (in one batch) and joined by a blank line. The server
  fetches nothing, so an ``http(s)://`` URL is a 400 that says to send a data URL.
- The text of that message and of later user messages picks the task
  (:mod:`vision_server.api.task_words`); system messages are ignored.
- ``model`` picks a served model by name (:mod:`vision_server.api.model_choice`): a server with
  one model takes any name (SillyTavern sends ``gpt-4-turbo`` unless told otherwise); with
  several, an unknown name is a 404 with code ``model_not_found``, as OpenAI answers. Replies
  name the model that captioned. ``max_tokens``/``max_completion_tokens``, ``temperature`` and
  ``top_p`` map onto generation; ``n`` must be 1. A request for JSON output, a forced tool
  call, logprobs or audio is a 400 (:mod:`vision_server.api.openai_unsupported`); other fields
  are ignored.
- The reply content is the caption itself. ``stream: true`` sends server-sent events in the
  OpenAI chunk format, token by token for greedy and sampled decoding of one image, in one
  chunk otherwise (:mod:`vision_server.api.openai_stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.bodies import read_json_object
from vision_server.api.captioning import caption_all_base64
from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import (
    MAX_TEMPERATURE,
    generation_options,
    json_bool,
    json_int,
    json_number,
    shown,
)
from vision_server.api.model_choice import chosen_model, model_states, resolve_exact
from vision_server.api.openai_inputs import Part, check_image_count, images_and_text, inline_image
from vision_server.api.openai_replies import ChatChunks, Completion, error_body
from vision_server.api.openai_stream import stream_captions
from vision_server.api.openai_unsupported import check_supported
from vision_server.api.scheduling import job_labels
from vision_server.api.state import ENGINE, SETTINGS, STARTED_AT
from vision_server.api.task_words import read_prompt
from vision_server.captioner import GenerationOptions
from vision_server.engine.lifecycle import ModelCard
from vision_server.errors import VisionServerError
from vision_server.model_specs import adapter_name, public_source
from vision_server.settings import Settings

OWNED_BY = "vision-server"


# --- errors ------------------------------------------------------------------------------------


def openai_error(error: VisionServerError, request_id: str) -> web.Response:
    return web.json_response(error_body(error), status=error.status)


# --- parsing the request -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion request asks of a captioner."""

    images: tuple[str, ...]  # data URLs or bare base64, in message order
    image_params: tuple[str, ...]  # where each one is, "messages[i].content[j].image_url"
    text: str  # the user's words about them
    options: GenerationOptions
    stream: bool
    include_usage: bool
    priority: object = None  # the extra ``priority`` field, checked with the request's labels
    keep_alive: object = None  # the extra ``keep_alive`` field (Ollama's), likewise


def parse_chat_request(
    body: dict[str, Any], settings: Settings, model: ModelCard | None = None
) -> ChatRequest:
    """Validate the body (for ``model``, whose token limit ``max_tokens`` must respect); every
    mistake becomes a 400 that names the offending field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "'messages' must be a non-empty list of chat messages.")
    located, text = _message_images_and_text(messages)
    images = [value for value, _ in located]
    check_image_count(len(images), settings, "messages")
    if json_int("n", body.get("n"), low=1, high=2**31) not in (None, 1):
        raise InvalidParameter("n", "Only n=1 is supported.")
    check_supported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    options = generation_options(
        settings,
        max_new_tokens=json_int(name, max_tokens, low=1, high=2**31),
        temperature=json_number("temperature", body.get("temperature"), low=0, high=MAX_TEMPERATURE),
        top_p=json_number("top_p", body.get("top_p"), low=0, high=1, low_open=True),
        model=model,
        length_name=name,
        caption_tokens=True,
    )
    stream = bool(json_bool("stream", body.get("stream")))
    include_usage = bool(
        json_bool("stream_options.include_usage", _stream_options(body).get("include_usage"))
    )
    return ChatRequest(
        tuple(images),
        tuple(where for _, where in located),
        text,
        options,
        stream,
        include_usage,
        body.get("priority"),
        body.get("keep_alive"),
    )


def _stream_options(body: dict[str, Any]) -> dict[str, Any]:
    """``stream_options``: an object, or null/absent (no options)."""
    value = body.get("stream_options")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParameter("stream_options", f"'stream_options' must be an object, not {shown(value)}.")
    return value


def _message_images_and_text(messages: list[Any]) -> tuple[list[tuple[str, str]], str]:
    """The images and user text the request asks about (:func:`images_and_text`)."""
    users = [_user_parts(index, message) for index, message in enumerate(messages)]
    how = 'add a user message part {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.'
    return images_and_text(users, "messages", how)


def _user_parts(index: int, message: Any) -> list[Part]:
    """A user message as ("text" | "image", value, where) triples; other roles give nothing."""
    if not isinstance(message, dict):
        raise InvalidParameter(f"messages[{index}]", f"messages[{index}] must be an object.")
    if message.get("role") != "user":
        return []
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content, f"messages[{index}].content")]
    if not isinstance(content, list):
        raise InvalidParameter(
            f"messages[{index}].content", f"messages[{index}].content must be a string or a list of parts."
        )
    return [pair for number, part in enumerate(content) if (pair := _part(index, number, part))]


def _part(index: int, number: int, part: Any) -> Part | None:
    where = f"messages[{index}].content[{number}]"
    if not isinstance(part, dict):
        raise InvalidParameter(where, f"{where} must be an object with a 'type'.")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidParameter(f"{where}.text", f"{where}.text must be a string.")
        return ("text", text, f"{where}.text")
    if kind == "image_url":
        value = part.get("image_url")  # an object with "url", or the URL itself
        url = value.get("url") if isinstance(value, dict) else value
        return ("image", inline_image(f"{where}.image_url", url), f"{where}.image_url")
    return None  # other part types (audio, files) carry nothing a captioner can use


# --- routes ------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    settings = request.app[SETTINGS]
    model = chosen_model(request, body.get("model"))
    chat = parse_chat_request(body, settings, model)
    labels = job_labels(request, chat.priority, keep_alive=chat.keep_alive)
    free_text = model.takes_prompt
    task, prompt = read_prompt(chat.text, model.tasks, settings.default_task, free_text=free_text)
    if chat.stream:
        return await stream_captions(
            request,
            chat.images,
            chat.image_params,
            task,
            chat.options,
            labels,
            prompt,
            model=model.name,
            shape=ChatChunks(model.name, chat.include_usage),
        )
    captions = await caption_all_base64(
        request, chat.images, task, chat.options, labels, prompt, model=model.name, where=chat.image_params
    )
    return web.json_response(Completion.of(model.name, captions).body())


def model_entries(app: web.Application) -> dict[str, dict[str, Any]]:
    """Every served model in OpenAI's model shape, plus where it comes from and its state."""
    engine = app[ENGINE]
    states = model_states(app)
    entries = {}
    for name in engine.model_names:
        card = engine.card(name)
        entries[name] = {
            "id": name,
            "object": "model",
            "created": int(app[STARTED_AT]),
            "owned_by": OWNED_BY,
            "source": public_source(card.source),  # "local", never a path
            "adapter": None if card.adapter is None else adapter_name(card.adapter),  # no paths
            "family": card.family,
            "state": states[name].state.value if name in states else None,
            "default": name == engine.default_model,
        }
    return entries


async def list_models(request: web.Request) -> web.Response:
    """Every served name in configured order (the default first where it is first)."""
    return web.json_response({"object": "list", "data": list(model_entries(request.app).values())})


async def get_model(request: web.Request) -> web.Response:
    """One served model by its name or source (404 ``model_not_found`` for any other)."""
    name = resolve_exact(request.app, request.match_info["model"])
    return web.json_response(model_entries(request.app)[name])


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes, with and without ``/v1``; :func:`vision_server.app.create_app` gives them
    this family's error shape."""
    routes = []
    for prefix, suffix in (("/v1", ""), ("", "_unversioned")):
        add_post, add_get = app.router.add_post, app.router.add_get
        routes += [
            add_post(f"{prefix}/chat/completions", chat_completions, name=f"openai.chat_completions{suffix}"),
            add_get(f"{prefix}/models", list_models, name=f"openai.models{suffix}"),
            add_get(f"{prefix}/models/{{model:.+}}", get_model, name=f"openai.model{suffix}"),
        ]
    return routes
