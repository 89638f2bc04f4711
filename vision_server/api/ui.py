"""The web page: its files, the security headers they travel with, and the page's own small API.

``GET /`` answers a browser (``Accept: text/html``) with the page; any other client gets exactly
what it got before the page existed (the native 404, or the 401 the API key check gives), so a
JSON client probing ``/`` sees no change. The page and its files are open (they hold no data and
must load before the user has typed the key); everything they fetch needs the API key like the
rest of the API. The Content-Security-Policy allows scripts, styles and connections from this
server only and no inline script at all, so a caption that smuggles markup cannot run anything
even if some code path were to treat it as HTML (none does: the page sets captions as text).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server import __version__
from vision_server.api.auth import check_api_key
from vision_server.api.captioning import caption_bytes
from vision_server.api.errors import NotFound
from vision_server.api.forms import read_form
from vision_server.api.model_choice import chosen_model, shown_model_id, shown_status
from vision_server.api.state import ENGINE, RECENT, SETTINGS
from vision_server.api.task_words import TASK_DESCRIPTIONS, default_task
from vision_server.engine.trace import CURRENT_TRACE
from vision_server.errors import BadRequest
from vision_server.model_specs import public_source
from vision_server.tasks import normalize_task

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE = "index.html"


@dataclass(frozen=True)
class PageFiles:
    """The page's files by name: their bytes and content type, read once at start."""

    files: dict[str, tuple[bytes, str]]


STATIC = web.AppKey("ui_static", PageFiles)


def load_static() -> PageFiles:
    """Every file of the page, read once at start from the installed package (no build step)."""
    files: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("vision_server.ui").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES:
            files[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    if PAGE not in files:
        raise RuntimeError("the package is missing vision_server/ui/index.html (a broken install?)")
    return PageFiles(files)


def secured(response: web.Response) -> web.Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "").lower()


async def page(request: web.Request) -> web.Response:
    if not wants_html(request):
        check_api_key(
            request, even_on_open_routes=True
        )  # the route is open for browsers only: others keep the old 401 / 404
        raise NotFound("Not Found")
    body, content_type = request.app[STATIC].files[PAGE]
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
    return secured(web.Response(body=body, headers=headers))


async def static_file(request: web.Request) -> web.Response:
    found = request.app[STATIC].files.get(request.match_info["name"])
    if found is None:
        raise NotFound(f"No file {request.match_info['name']!r} in the web page.")
    body, content_type = found
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
    return secured(web.Response(body=body, headers=headers))


def listed_tasks(tasks: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"task": task, "description": TASK_DESCRIPTIONS.get(task, "")} for task in tasks]


async def info(request: web.Request) -> web.Response:
    """What the page needs to draw itself: the models and their tasks (the default model's at
    the top level, as before several models), and whether there is a gallery."""
    settings = request.app[SETTINGS]
    engine = request.app[ENGINE]
    tasks = engine.model_card.tasks
    cards = [engine.card(name) for name in engine.model_names]
    return web.json_response(
        {
            "version": __version__,
            "model": shown_model_id(engine.model_card),
            "tasks": listed_tasks(tasks),
            "default_task": default_task(settings.default_task, tasks),
            "default_model": engine.default_model,
            "models": [
                {
                    "name": card.name,
                    "source": public_source(card.source),
                    "tasks": listed_tasks(card.tasks),
                    "default_task": default_task(settings.default_task, card.tasks),
                }
                for card in cards
            ],
            "gallery": None
            if settings.gallery is None
            else {
                "name": settings.gallery.name or str(settings.gallery),
                "writable": settings.gallery_writable,
                "page_size": settings.gallery_page_size,
                "jsonl": settings.gallery_jsonl is not None,
            },
        }
    )


async def status(request: web.Request) -> web.Response:
    """The status panel: engine state, time to the idle unload, the last batches and their speed."""
    engine = request.app[ENGINE]
    data: dict[str, Any] = engine.status().as_dict()
    shown_status(request.app, data, training=False)  # models and adapters by name, not path
    now = time.time()
    data["now"] = now
    data["idle_unload_in"] = None if data["expires_at"] is None else max(0.0, data["expires_at"] - now)
    batches = request.app[RECENT].snapshot()
    data["recent_batches"] = [
        {"finished_at": b.finished_at, "size": b.size, "seconds": round(b.seconds, 4),
         "images_per_second": round(b.images_per_second, 2)} for b in batches
    ]  # fmt: skip
    seconds = sum(b.seconds for b in batches)
    data["images_per_second"] = round(sum(b.size for b in batches) / seconds, 2) if seconds > 0 else None
    return web.json_response(data)


async def caption(request: web.Request) -> web.Response:
    """Try it: one uploaded image, a task and a model (optional) → the caption, the time it took,
    and its queue wait."""
    started = time.perf_counter()
    form = await read_form(request, ("image",), request.app[SETTINGS].max_request_bytes)
    if not form.files:
        raise BadRequest("No image uploaded: send the file in the form field 'image'.")
    model = chosen_model(request, form.fields.get("model"))
    task_text = form.fields.get("task", "").strip()
    task = normalize_task(task_text, model.tasks) if task_text else default_task("<CAPTION>", model.tasks)
    options = request.app[SETTINGS].generation_defaults()
    result = await caption_bytes(request, form.files[0].data, task, options, model=model.name)
    trace = CURRENT_TRACE.get()
    return web.json_response(
        {
            "caption": result.text,
            "model": model.name,
            "task": task,
            "seconds": round(time.perf_counter() - started, 3),
            "queue_wait": round(trace.queue_wait, 3) if trace is not None and trace.jobs else None,
            "batch_size": trace.batch_size if trace is not None and trace.jobs else None,
        }
    )


def setup_page(app: web.Application) -> list[AbstractRoute]:
    """``/`` (answers in the native shape: non-browsers get what they always got)."""
    app[STATIC] = load_static()
    return [app.router.add_route("*", "/", page, name="ui.page")]


def setup(app: web.Application) -> list[AbstractRoute]:
    """The page's files and API (errors in the operations shape, which the page reads)."""
    return [
        app.router.add_get("/ui/api/info", info, name="ui.info"),
        app.router.add_get("/ui/api/status", status, name="ui.status"),
        app.router.add_post("/ui/api/caption", caption, name="ui.caption"),
        app.router.add_get("/ui/{name}", static_file, name="ui.static"),
    ]
