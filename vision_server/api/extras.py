"""SillyTavern Extras captioning, the legacy source SillyTavern still offers.

``GET /api/modules`` → ``{"modules": ["caption"]}`` (SillyTavern refuses to caption unless
"caption" is listed); ``POST /api/caption`` ``{"image": base64 or data URL, "prompt"?: str}``
→ ``{"caption": str}``; errors ``{"error": str}`` as the Extras server sends them. The browser
calls these routes directly, so they need ``--cors-origin`` (:mod:`vision_server.api.cors`).
SillyTavern sends no prompt here; an optional ``prompt`` picks the task as free text does
elsewhere, and without one the server's default task is used. SillyTavern sends no model name
either (its requests caption with the default model); an optional ``model`` picks one.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.bodies import read_json_object
from vision_server.api.captioning import caption_base64
from vision_server.api.model_choice import chosen_model
from vision_server.api.scheduling import job_labels
from vision_server.api.state import SETTINGS
from vision_server.api.task_words import read_prompt
from vision_server.errors import BadRequest, VisionServerError

MODULES = ("caption",)


def extras_error(error: VisionServerError, request_id: str) -> web.Response:
    return web.json_response({"error": error.message}, status=error.status)


async def modules(request: web.Request) -> web.Response:
    return web.json_response({"modules": list(MODULES)})


async def caption(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    image = body.get("image")
    if not isinstance(image, str):
        raise BadRequest('"image" is required: a base64 string or data URL.')
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest('"prompt" must be a string.')
    model = chosen_model(request, body.get("model"))
    settings = request.app[SETTINGS]
    task, free_text = read_prompt(prompt, model.tasks, settings.default_task, free_text=model.takes_prompt)
    labels = job_labels(request, body.get("priority"), keep_alive=body.get("keep_alive"))
    options = settings.generation_defaults()
    result = await caption_base64(request, image, task, options, labels, free_text, model=model.name)
    return web.json_response({"caption": result.text})


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes; :func:`vision_server.app.create_app` gives them this family's error shape."""
    return [
        app.router.add_get("/api/modules", modules, name="extras.modules"),
        app.router.add_post("/api/caption", caption, name="extras.caption"),
    ]
