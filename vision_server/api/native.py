"""The florence2-visionapi API, byte for byte: existing scripts keep working unchanged.

``POST /process_image`` ``{"image", "prompt"}`` → ``{"result"}``; ``GET /prompts`` → a JSON
array of task tokens; ``GET /model`` → a bare JSON string; errors are ``{"detail": str}``.
Beyond the original: an optional ``"model"`` in the body picks a served model, and
``GET /prompts?model=NAME`` lists that model's tasks (:mod:`vision_server.api.model_choice`).
The reply names the model that captioned in an ``X-Model`` header (not in the body, which stays
the original's byte for byte), as every family's caption replies do
(:mod:`vision_server.api.served_model`), so a folder run can record it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.bodies import read_json_object, require_str
from vision_server.api.captioning import caption_base64
from vision_server.api.errors import MissingField
from vision_server.api.model_choice import chosen_model, looked_up_model, shown_model_id
from vision_server.api.scheduling import job_labels
from vision_server.api.state import ENGINE, SETTINGS
from vision_server.api.task_words import read_prompt
from vision_server.errors import VisionServerError
from vision_server.tasks import CAPTION_TASK, normalize_task


def native_error(error: VisionServerError, request_id: str) -> web.Response:
    status = 422 if isinstance(error, MissingField) else error.status
    return web.json_response({"detail": error.message}, status=status)


async def process_image(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    image_text = require_str(body, "image")
    prompt = require_str(body, "prompt")
    model = chosen_model(request, body.get("model"))
    if model.takes_prompt:  # a task name picks the task; other text goes to the model
        task, free_text = read_prompt(prompt, model.tasks, CAPTION_TASK, free_text=True)
    else:
        task, free_text = normalize_task(prompt, model.tasks), None
    labels = job_labels(request, body.get("priority"), keep_alive=body.get("keep_alive"))
    options = request.app[SETTINGS].generation_defaults()
    caption = await caption_base64(request, image_text, task, options, labels, free_text, model=model.name)
    return web.json_response({"result": caption.text})


async def prompts(request: web.Request) -> web.Response:
    """The default model's tasks, or with ``?model=NAME`` that model's (404 for an unknown name)."""
    return web.json_response(list(looked_up_model(request).tasks))


async def model(request: web.Request) -> web.Response:
    """The default model's id as a bare JSON string: a hub id as the original gives it, a local
    directory by its served name (its path would show clients the server's disk)."""
    return web.json_response(shown_model_id(request.app[ENGINE].model_card))


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes; :func:`vision_server.app.create_app` gives them this family's error shape."""
    return [
        app.router.add_post("/process_image", process_image, name="native.process_image"),
        app.router.add_get("/prompts", prompts, name="native.prompts"),
        app.router.add_get("/model", model, name="native.model"),
    ]
