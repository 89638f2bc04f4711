"""Multipart uploads (``curl -F image=@photo.jpg``), the API of the generic captioning servers.

- ``POST /caption``: one file in ``image`` (or ``file``) → ``{"caption", "confidence",
  "processing_time", "model_info"}``. Default task ``<CAPTION>``.
- ``POST /detailed_caption``: the same with default task ``<MORE_DETAILED_CAPTION>`` (the
  "very detailed description"; ``<DETAILED_CAPTION>`` is PromptGen's structured, positional one).
- ``POST /batch_caption``: repeated ``images`` (or ``files``) → ``{"results": [{"filename",
  "caption", "confidence"}], "total_processing_time"}``. All files are queued at once, so they
  share batches; a file that cannot be read gets ``{"filename", "error"}`` in its slot and the
  others still get captions. When no file got a caption the whole request fails: with the
  server's status if a failure was the server's (queue full, model failed to load), else with
  the first file's (400 for a file that is not an image, 413 for too many pixels).
- ``GET /tasks`` and ``GET /model_info``: the default model's, or ``?model=NAME``'s.

Optional fields: ``model`` (a served model's name, :mod:`vision_server.api.model_choice`; the
default model without it), ``task`` (a task name of that model, checked: 400 for an unknown
one), ``prompt`` (free text, read like a chat prompt), ``max_length`` (or ``max_new_tokens``),
``temperature`` (> 0 samples), ``top_p``, ``num_beams``, ``do_sample``; ``batch_size`` is
accepted and ignored (the server batches across all clients). ``confidence`` is the geometric
mean of the probabilities of the caption's tokens, in 0..1. Errors are ``{"detail": str}``,
the FastAPI shape those servers answer with (and the native family's), with the status from
the design's error table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server import __version__
from vision_server.api.captioning import caption_bytes
from vision_server.api.errors import REQUEST_ID
from vision_server.api.forms import Form, Upload, read_form
from vision_server.api.generation import (
    MAX_BEAMS,
    MAX_TEMPERATURE,
    as_bool,
    as_int,
    as_number,
    generation_options,
)
from vision_server.api.model_choice import (
    adapter_of,
    chosen_model,
    looked_up_model,
    model_states,
    shown_model_id,
)
from vision_server.api.scheduling import job_labels
from vision_server.api.state import ENGINE, SETTINGS
from vision_server.api.task_words import TASK_DESCRIPTIONS, default_task, read_prompt
from vision_server.captioner import Caption, GenerationOptions
from vision_server.engine.jobs import Lane
from vision_server.engine.lifecycle import ModelCard
from vision_server.errors import BadRequest, VisionServerError
from vision_server.settings import Settings
from vision_server.tasks import CAPTION_TASK, normalize_task
from vision_server.train.metadata import adapter_summary

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("image", "file")
# Every file field is read on every route: /caption takes one file from any of them.
BATCH_FIELDS = ("images", "images[]", "files", "files[]", *IMAGE_FIELDS)
DETAILED_TASK = "<MORE_DETAILED_CAPTION>"


def multipart_error(error: VisionServerError, request_id: str) -> web.Response:
    return web.json_response({"detail": error.message}, status=error.status)


# --- reading the form --------------------------------------------------------------------------


def task_for(
    form: Form, tasks: tuple[str, ...], route_default: str, *, free_text: bool = False
) -> tuple[str, str | None]:
    """``task`` is an explicit name; ``prompt`` is free text (for the model itself when it reads
    free text); neither: the route's default task. Returns the task and the model's prompt."""
    if form.fields.get("task", "").strip():
        task = normalize_task(form.fields["task"], tasks)
        if not free_text or not form.fields.get("prompt", "").strip():
            return task, None
        return task, read_prompt(form.fields["prompt"], tasks, task, free_text=True)[1]
    return read_prompt(
        form.fields.get("prompt"), tasks, default_task(route_default, tasks), free_text=free_text
    )


def options_for(form: Form, request: web.Request, model: ModelCard) -> GenerationOptions:
    fields = form.fields
    length_name = "max_length" if fields.get("max_length") else "max_new_tokens"
    return generation_options(
        request.app[SETTINGS],
        max_new_tokens=as_int(length_name, fields.get(length_name), low=1, high=2**31),
        temperature=as_number("temperature", fields.get("temperature"), low=0, high=MAX_TEMPERATURE),
        top_p=as_number("top_p", fields.get("top_p"), low=0, high=1, low_open=True),
        num_beams=as_int("num_beams", fields.get("num_beams"), low=1, high=MAX_BEAMS),
        do_sample=as_bool("do_sample", fields.get("do_sample")),
        with_confidence=True,
        model=model,
        length_name=length_name,
    )


def no_image(form: Form, names: tuple[str, ...]) -> BadRequest:
    sent = f" (files came in: {', '.join(map(repr, form.ignored_files))})" if form.ignored_files else ""
    return BadRequest(f"No image uploaded: send the file in the form field {names[0]!r}{sent}.")


# --- replies -----------------------------------------------------------------------------------


def brief_model_info(model: ModelCard, task: str) -> dict[str, Any]:
    return {"model_type": model.family, "model": model.name, "task": task, "version": __version__}


def confidence_of(caption: Caption) -> float | None:
    return round(caption.confidence, 4) if caption.confidence is not None else None


def seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


# --- routes ------------------------------------------------------------------------------------


async def _single(request: web.Request, route_default: str) -> web.Response:
    started = time.perf_counter()
    form = await read_form(request, BATCH_FIELDS, request.app[SETTINGS].max_request_bytes)
    if not form.files:
        raise no_image(form, IMAGE_FIELDS)
    if len(form.files) > 1:
        raise BadRequest(f"{len(form.files)} files uploaded; send one here, or several to /batch_caption.")
    model = chosen_model(request, form.fields.get("model"))
    task, prompt = task_for(form, model.tasks, route_default, free_text=model.takes_prompt)
    labels = job_labels(request, form.fields.get("priority"), keep_alive=form.fields.get("keep_alive"))
    options = options_for(form, request, model)
    result = await caption_bytes(request, form.files[0].data, task, options, labels, prompt, model=model.name)
    return web.json_response(
        {
            "caption": result.text,
            "confidence": confidence_of(result),
            "processing_time": seconds_since(started),
            "model_info": brief_model_info(model, task),
        }
    )


async def caption(request: web.Request) -> web.Response:
    return await _single(request, CAPTION_TASK)


async def detailed_caption(request: web.Request) -> web.Response:
    return await _single(request, DETAILED_TASK)


async def batch_caption(request: web.Request) -> web.Response:
    started = time.perf_counter()
    form = await read_form(request, BATCH_FIELDS, request.app[SETTINGS].max_request_bytes)
    if not form.files:
        raise no_image(form, BATCH_FIELDS)
    limit = request.app[SETTINGS].max_images_per_request
    if len(form.files) > limit:
        raise BadRequest(
            f"The form has {len(form.files)} files; the limit is {limit} per request "
            "(--max-images-per-request). Send the others in further requests."
        )
    model = chosen_model(request, form.fields.get("model"))
    task, prompt = task_for(form, model.tasks, CAPTION_TASK, free_text=model.takes_prompt)
    options = options_for(form, request, model)
    labels = job_labels(
        request, form.fields.get("priority"), default=Lane.BULK, keep_alive=form.fields.get("keep_alive")
    )
    outcomes = await asyncio.gather(
        *(
            caption_bytes(request, upload.data, task, options, labels, prompt, model=model.name)
            for upload in form.files
        ),
        return_exceptions=True,
    )
    raise_if_nothing_worked(outcomes)
    results = [slot(request, upload, outcome) for upload, outcome in zip(form.files, outcomes, strict=True)]
    return web.json_response({"results": results, "total_processing_time": seconds_since(started)})


def raise_if_nothing_worked(outcomes: list[Caption | BaseException]) -> None:
    """Fail the whole batch when no file got a caption: the server's trouble first (clients retry
    it as a whole), else the first file's own error (every file was bad: a 4xx, not a 200)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancellation
    if any(isinstance(outcome, Caption) for outcome in outcomes):
        return
    errors = [outcome for outcome in outcomes if isinstance(outcome, VisionServerError)]
    if errors:
        raise next((error for error in errors if error.status >= 500), errors[0])


def slot(request: web.Request, upload: Upload, outcome: Caption | BaseException) -> dict[str, Any]:
    if isinstance(outcome, Caption):
        return {"filename": upload.filename, "caption": outcome.text, "confidence": confidence_of(outcome)}
    if isinstance(outcome, VisionServerError):
        return {"filename": upload.filename, "error": outcome.message}
    request_id = request.get(REQUEST_ID, "-")
    log.error(
        "captioning %s failed (request id %s)",
        upload.filename,
        request_id,
        exc_info=outcome,
        extra={"request_id": request_id},
    )
    return {"filename": upload.filename, "error": f"Internal server error (request id {request_id})."}


async def tasks(request: web.Request) -> web.Response:
    model_tasks = looked_up_model(request).tasks
    listed = [{"task": task, "description": TASK_DESCRIPTIONS.get(task, "")} for task in model_tasks]
    return web.json_response({"tasks": listed, "default": default_task(CAPTION_TASK, model_tasks)})


async def model_info(request: web.Request) -> web.Response:
    app = request.app
    card = looked_up_model(request)
    state = model_states(app)[card.name].state
    settings = app[SETTINGS]
    return web.json_response(
        {
            "model_type": card.family,
            "model": shown_model_id(card),
            "version": __version__,
            "state": state.value,
            "device": card.device,
            "dtype": card.dtype,
            "tasks": list(card.tasks),
            "generation": generation_defaults(settings, card),
            "max_batch_size": app[ENGINE].config.max_batch_size,  # the size in use, not the setting
            "adapter": adapter_summary(adapter_of(app, card)),
        }
    )


def generation_defaults(settings: Settings, card: ModelCard) -> dict[str, Any]:
    """What a request that sets nothing gets from this model: --max-new-tokens, stopped at the
    model's own limit (``max_new_tokens_limit``, null while unknown), and the beams."""
    limit = card.max_new_tokens
    tokens = settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit)
    return {"max_new_tokens": tokens, "max_new_tokens_limit": limit, "num_beams": settings.num_beams}


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes; :func:`vision_server.app.create_app` gives them this family's error shape."""
    return [
        app.router.add_post("/caption", caption, name="multipart.caption"),
        app.router.add_post("/detailed_caption", detailed_caption, name="multipart.detailed_caption"),
        app.router.add_post("/batch_caption", batch_caption, name="multipart.batch_caption"),
        app.router.add_get("/tasks", tasks, name="multipart.tasks"),
        app.router.add_get("/model_info", model_info, name="multipart.model_info"),
    ]
