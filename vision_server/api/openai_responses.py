"""OpenAI's Responses API for captioning: ``POST /v1/responses`` (also ``/responses``).

The SDKs' newer ``client.responses.create`` calls it. A request means what a chat completion
means (:mod:`vision_server.api.openai`), spelled the Responses way:

- ``input`` is a string (text only: no image, so a 400) or a list of message items
  (``{"role", "content"}``, ``type`` ``"message"`` or absent). A user message's ``content`` is a
  string or a list of ``input_text`` and ``input_image`` parts; ``input_image.image_url`` is a
  ``data:`` URL or bare base64 (:mod:`vision_server.api.openai_inputs`: nothing is fetched).
  ``input_file`` and ``input_audio`` parts, an ``input_image`` by ``file_id``, and items that
  are not messages (tool outputs, item references) are a 400.
- The images of the last user message that has any are captioned; the user text from there
  on picks the task (:mod:`vision_server.api.task_words`). ``instructions`` (like system and
  developer messages) is not read for the task: it is the system prompt, and SDK code sets one
  out of habit; the reply echoes it.
- ``model`` picks the served model; ``max_output_tokens``, ``temperature`` and ``top_p`` map
  onto generation; ``priority`` and ``keep_alive`` are the same extra fields as for chat.
- What needs state kept at OpenAI, tools, JSON output or logprobs is a 400
  (:mod:`vision_server.api.openai_responses_unsupported`); ``store`` is accepted and never
  honoured (replies say ``"store": false``). Other fields are ignored.
- The reply is a ``response`` object, or with ``stream: true`` its named events
  (:mod:`vision_server.api.openai_response_objects`), token by token where chat's would be.

Since nothing is stored, ``/v1/responses/{id}`` (retrieve, delete, cancel, input items) and the
other ``/v1/responses/...`` paths answer a 404 in OpenAI's shape that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.bodies import read_json_object
from vision_server.api.captioning import caption_all_base64
from vision_server.api.errors import InvalidParameter, NotFound
from vision_server.api.generation import (
    MAX_TEMPERATURE,
    generation_options,
    json_bool,
    json_int,
    json_number,
    shown,
)
from vision_server.api.model_choice import chosen_model
from vision_server.api.openai_inputs import Part, check_image_count, images_and_text, inline_image
from vision_server.api.openai_response_objects import ResponseEvents, ResponseObject
from vision_server.api.openai_responses_unsupported import check_responses_supported
from vision_server.api.openai_stream import stream_captions
from vision_server.api.openai_unsupported import UnsupportedValue
from vision_server.api.scheduling import job_labels
from vision_server.api.state import SETTINGS
from vision_server.api.task_words import read_prompt
from vision_server.captioner import GenerationOptions
from vision_server.engine.lifecycle import ModelCard
from vision_server.settings import Settings

ROLES = ("user", "assistant", "system", "developer")
HOW_TO_ADD_AN_IMAGE = (
    "add a part "
    '{"type": "input_image", "image_url": "data:image/png;base64,..."} to the content of a user '
    "message in input."
)


@dataclass(frozen=True)
class ResponsesRequest:
    """What a Responses API request asks of a captioner."""

    images: tuple[str, ...]  # data URLs or bare base64, in input order
    image_params: tuple[str, ...]  # where each one is, "input[i].content[j].image_url"
    text: str  # the user's words about them
    options: GenerationOptions
    stream: bool
    echo: dict[str, Any]  # the request's settings, as the reply repeats them
    priority: object = None
    keep_alive: object = None


def parse_responses_request(
    body: dict[str, Any], settings: Settings, model: ModelCard | None = None
) -> ResponsesRequest:
    """Validate the body; every mistake is a 400 that names the offending field."""
    check_responses_supported(body)
    located, text = images_and_text(_input_users(body.get("input")), "input", HOW_TO_ADD_AN_IMAGE)
    check_image_count(len(located), settings, "input")
    max_tokens = json_int("max_output_tokens", body.get("max_output_tokens"), low=1, high=2**31)
    temperature = json_number("temperature", body.get("temperature"), low=0, high=MAX_TEMPERATURE)
    top_p = json_number("top_p", body.get("top_p"), low=0, high=1, low_open=True)
    options = generation_options(
        settings,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        model=model,
        length_name="max_output_tokens",
        caption_tokens=True,
    )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidParameter("instructions", f"instructions must be a string, not {shown(instructions)}.")
    metadata = body.get("metadata")
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    return ResponsesRequest(
        images=tuple(image for image, _ in located),
        image_params=tuple(where for _, where in located),
        text=text,
        options=options,
        stream=bool(json_bool("stream", body.get("stream"))),
        echo=echo,
        priority=body.get("priority"),
        keep_alive=body.get("keep_alive"),
    )


def _input_users(value: object) -> list[list[Part]]:
    """``input`` as the parts of each item (only user messages have any)."""
    if isinstance(value, str):
        return [[("text", value, "input")]]
    if not isinstance(value, list) or not value:
        raise InvalidParameter(
            "input", f"input must be a string or a non-empty list of messages, not {shown(value)}."
        )
    return [_item_parts(index, item) for index, item in enumerate(value)]


def _item_parts(index: int, item: object) -> list[Part]:
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidParameter(where, f"{where} must be a message object with 'role' and 'content'.")
    kind = item.get("type", "message")
    if kind != "message":
        raise UnsupportedValue(
            f"{where}.type",
            f"{where} is a {shown(kind)} item; this server reads only messages (role and content): "
            "it keeps no earlier responses and calls no tools.",
        )
    role = item.get("role")
    if role not in ROLES:
        raise InvalidParameter(
            f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, not {shown(role)}."
        )
    content = item.get("content")
    if role != "user":
        return []  # instructions, earlier answers: not read for the task
    if isinstance(content, str):
        return [("text", content, f"{where}.content")]
    if not isinstance(content, list):
        raise InvalidParameter(f"{where}.content", f"{where}.content must be a string or a list of parts.")
    return [_part(f"{where}.content[{number}]", part) for number, part in enumerate(content)]


def _part(where: str, part: object) -> Part:
    if not isinstance(part, dict):
        raise InvalidParameter(where, f"{where} must be an object with a 'type'.")
    kind = part.get("type")
    if kind == "input_text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidParameter(f"{where}.text", f"{where}.text must be a string.")
        return ("text", text, f"{where}.text")
    if kind == "input_image":
        if part.get("image_url") is None and part.get("file_id") is not None:
            raise UnsupportedValue(
                f"{where}.file_id",
                "Images by file_id cannot be read: this server keeps no uploaded files. Send the "
                "image inline as image_url: data:image/png;base64,...",
            )
        return ("image", inline_image(f"{where}.image_url", part.get("image_url")), f"{where}.image_url")
    if kind in ("input_file", "input_audio"):
        raise UnsupportedValue(
            f"{where}.type",
            f"{kind} parts cannot be read: this server captions images. Send images as input_image "
            "parts (a data URL) and words as input_text.",
        )
    raise InvalidParameter(
        f"{where}.type", f"{where} has type {shown(kind)}; send input_text and input_image parts."
    )


# --- routes ------------------------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    settings = request.app[SETTINGS]
    model = chosen_model(request, body.get("model"))
    asked = parse_responses_request(body, settings, model)
    labels = job_labels(request, asked.priority, keep_alive=asked.keep_alive)
    task, prompt = read_prompt(asked.text, model.tasks, settings.default_task, free_text=model.takes_prompt)
    reply = ResponseObject(model.name, asked.echo)
    if asked.stream:
        return await stream_captions(
            request,
            asked.images,
            asked.image_params,
            task,
            asked.options,
            labels,
            prompt,
            model=model.name,
            shape=ResponseEvents(reply),
        )
    captions = await caption_all_base64(
        request, asked.images, task, asked.options, labels, prompt, model=model.name, where=asked.image_params
    )
    return web.json_response(reply.body(captions))


async def nothing_stored(request: web.Request) -> web.StreamResponse:
    """Retrieve, delete, cancel, input items, token counts: none exist without stored responses."""
    raise NotFound(
        f"Not Found: {request.method} {request.path}: this server stores no responses (every reply "
        'says "store": false), so there is none to retrieve, cancel, delete or list. It offers '
        "POST /v1/responses, which answers with the caption in the same request."
    )


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes, with and without ``/v1``; :func:`vision_server.app.create_app` gives them
    OpenAI's error shape."""
    routes = []
    for prefix, suffix in (("/v1", ""), ("", "_unversioned")):
        routes += [
            app.router.add_post(f"{prefix}/responses", create_response, name=f"openai.responses{suffix}"),
            app.router.add_route(
                "*",
                f"{prefix}/responses/{{rest:.+}}",
                nothing_stored,
                name=f"openai.responses_stored{suffix}",
            ),
        ]
    return routes
