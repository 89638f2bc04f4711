"""The gallery's HTTP routes: pages of images with their captions, thumbnails, edits, fresh
captions through the engine, and export.

Every route names images by their path relative to the gallery root (``?path=`` or a JSON
``paths`` list). A path that is not an image the gallery listed (``..``, an absolute path, a
symlink out of the root, any encoding of those, or simply a missing file) is a 404, the same for
all, so nothing outside the folder can be read, written or even probed. Saving needs
``--gallery-writable``; without it a save is a 403 that says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.access import FileDownload, deliver
from vision_server.api.bodies import read_json_object
from vision_server.api.captioning import submit_item
from vision_server.api.errors import InvalidParameter, NotFound
from vision_server.api.model_choice import chosen_model, spec_for
from vision_server.api.scheduling import job_labels
from vision_server.api.state import DECODER, ENGINE, SETTINGS
from vision_server.bounded_files import read_at_most
from vision_server.captioner import CaptionItem
from vision_server.captionfiles import describe_os_error, one_line, printable
from vision_server.engine.jobs import Lane
from vision_server.errors import BadRequest, Forbidden, VisionServerError
from vision_server.gallery.catalog import Catalog, Entry, Query
from vision_server.gallery.paths import beside, from_url_form, raw_query_value
from vision_server.gallery.sidecars import MAX_SAVE_CHARS, PRIMARY, is_caption_suffix, sidecar_path
from vision_server.gallery.thumbs import ThumbnailError, Thumbnails
from vision_server.images import LOCAL_FILE
from vision_server.settings import Settings, SettingsError
from vision_server.tasks import normalize_task

T = TypeVar("T")


class SharedCaptionFile(VisionServerError):
    """A save into a caption file that another image of the folder shares (``a.jpg``, ``a.png``)."""

    status = 409
    code = "shared_caption_file"


class CaptionFileUnwritable(VisionServerError):
    """A caption file the server could not write: a read-only dataset, no permission, a full
    disk, a folder in its place. The server's trouble, not the request's, so a 500, but one that
    names the file and the reason instead of pointing at a traceback."""

    status = 500
    code = "caption_file_unwritable"


log = logging.getLogger("vision_server")
MAX_PATHS = 1000  # images per re-caption or export request
IN_FLIGHT = 8  # images one re-caption request has queued at a time
THUMBNAILS_AT_ONCE = 2  # full-size decodes for thumbnails (a 64 MP PNG decodes to 192 MB)
# A dataset's files come from anywhere (a scrape, a download): whatever bytes hide behind an
# image name, the browser must take them as the type we name and run nothing, even when the
# user opens one in a tab of its own (same origin as the page that holds the API key).
FILE_HEADERS = {
    "Cache-Control": "private, max-age=300",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
READ_ONLY = (
    "The gallery is read-only: start the server with --gallery-writable to save captions "
    "into the dataset's caption files."
)


class Gallery:
    """The catalog plus the lock that keeps its (blocking) file work to one thread at a time."""

    def __init__(self, catalog: Catalog, thumbnails: Thumbnails) -> None:
        self.catalog = catalog
        self.thumbnails = thumbnails
        self._lock = asyncio.Lock()
        self.thumbnail_slots = asyncio.Semaphore(THUMBNAILS_AT_ONCE)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(func, *args)

    async def entry(self, key: object) -> Entry:
        """The listed image ``key`` names; else a 404 that names it back as sent (the same
        words for a missing file and a path out of the root), so a re-caption or export of many
        says which one is gone."""
        found = await self.run(self.catalog.find, key) if isinstance(key, str) else None
        if found is None:
            named = f": {shortened(printable(key))}" if isinstance(key, str) else ""
            raise NotFound(f"No such image in the gallery{named}.")
        return found


def shortened(text: str, most: int = 200) -> str:
    """``text`` cut to ``most`` characters (a client may send any path): a message stays short."""
    return text if len(text) <= most else text[: most - 1] + "…"


GALLERY = web.AppKey("gallery", Gallery)


async def write_caption(gallery: Gallery, entry: Entry, suffix: str, text: str) -> None:
    """Save one caption file (atomically: on failure the old file is left as it was)."""
    try:
        await gallery.run(gallery.catalog.save, entry, suffix, text)
    except OSError as exc:
        target = sidecar_path(entry.path, suffix)
        # strerror: the reason in words (a read-only caption's says what to do); str(exc) would
        # add the path as Python's repr, quotes and surrogate escapes included.
        reason = printable(exc.strerror or str(exc))
        # Printable in the log too: a line break in a name would split the server's log line.
        log.warning("gallery: cannot write the caption file %s: %s", printable(str(target)), reason)
        shown = printable(beside(entry.key, target.name))
        # The dataset tools' own reasons (a read-only file, a folder in its place) begin with the
        # file's bare name: here it is named from the root, as the rest of the message names it.
        bare = printable(target.name) + " "
        if reason.startswith(bare):
            reason = f"{shown} {reason.removeprefix(bare)}"
        raise CaptionFileUnwritable(
            f"Cannot write the caption file {shown} of {printable(entry.key)}: {reason}."
        ) from None


def gallery_from(settings: Settings) -> Gallery:
    """The gallery of ``--gallery``; a folder that is not there is a start-up error."""
    root = settings.gallery
    if root is None:
        raise ValueError("no gallery configured")
    # printable: a line break in the path would split the one line the start-up error is
    if not root.is_dir():
        raise SettingsError(f"gallery {printable(str(root))} is not a folder", setting="gallery")
    jsonl = settings.gallery_jsonl
    if jsonl is not None and not jsonl.is_file():
        raise SettingsError(f"gallery_jsonl {printable(str(jsonl))} is not a file", setting="gallery_jsonl")
    catalog = Catalog(
        root, writable=settings.gallery_writable, page_size=settings.gallery_page_size,
        jsonl=settings.gallery_jsonl,
    )  # fmt: skip
    thumbnails = Thumbnails(
        settings.cache_dir / "gallery-thumbs", settings.max_image_pixels, settings.thumbnail_cache_bytes
    )
    return Gallery(catalog, thumbnails)


def query_from(request: web.Request) -> tuple[int, Query]:
    params = request.query
    try:
        number = int(params.get("page", "1"))
    except ValueError:
        raise InvalidParameter("page", f"page must be a whole number, not {params.get('page')!r}") from None
    field, has = params.get("field", "all"), params.get("has", "any")
    if field not in ("all", "name", "caption"):
        raise InvalidParameter("field", f"field must be all, name or caption, not {field!r}")
    if has not in ("any", "with", "without"):
        raise InvalidParameter("has", f"has must be any, with or without, not {has!r}")
    return number, Query(text=params.get("q", "").strip(), field=field, has=has)  # type: ignore[arg-type]


def paths_from(body: dict[str, Any]) -> list[str]:
    paths = body.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise InvalidParameter("paths", "paths must be a non-empty list of image paths from the gallery.")
    if len(paths) > MAX_PATHS:
        raise InvalidParameter("paths", f"{len(paths)} paths; send at most {MAX_PATHS} per request.")
    return list(dict.fromkeys(paths))


# --- routes --------------------------------------------------------------------------------------


async def page(request: web.Request) -> web.Response:
    gallery = request.app[GALLERY]
    number, query = query_from(request)
    data = await gallery.run(gallery.catalog.page, number, query)
    data["writable"] = gallery.catalog.writable
    return web.json_response(data)


def query_key(request: web.Request) -> str | None:
    """``?path=``, percent-decoded by us: bytes of a name that is not UTF-8 (the page sends an
    item's ``ref``) come back as the name on disk; a framework would make them U+FFFD."""
    value = raw_query_value(request.rel_url.raw_query_string, "path")
    return None if value is None else from_url_form(value)


async def thumbnail(request: web.Request) -> web.Response:
    gallery = request.app[GALLERY]
    entry = await gallery.entry(query_key(request))
    try:
        async with gallery.thumbnail_slots:
            data = await asyncio.to_thread(gallery.thumbnails.get, entry.path)
    except ThumbnailError as exc:
        raise BadRequest(f"No thumbnail for {printable(entry.key)}: {exc}") from None
    return web.Response(body=data, headers={"Content-Type": "image/jpeg", **FILE_HEADERS})


async def image(request: web.Request) -> web.StreamResponse:
    entry = await request.app[GALLERY].entry(query_key(request))
    return await deliver(request, FileDownload(entry.path, headers=FILE_HEADERS))


async def save(request: web.Request) -> web.Response:
    """``{"path", "source": ".txt", "text"}``: replace one caption file, atomically."""
    gallery = request.app[GALLERY]
    if not gallery.catalog.writable:
        raise Forbidden(READ_ONLY)
    body = await read_json_object(request)
    source, text = body.get("source", PRIMARY), body.get("text")
    if not isinstance(source, str) or not is_caption_suffix(source):
        raise InvalidParameter("source", "source must be a caption file suffix such as .txt or .tags.")
    if not isinstance(text, str):
        raise InvalidParameter("text", "text must be the caption, a string.")
    if len(text) > MAX_SAVE_CHARS:
        limit = f"the limit is {MAX_SAVE_CHARS}"
        raise InvalidParameter("text", f"The caption is {len(text)} characters; {limit}.")
    check_unicode(text)
    entry = await gallery.entry(body.get("path"))
    shared = gallery.catalog.shared_file(entry, source)
    if shared is not None:
        raise SharedCaptionFile(f"{printable(entry.key)} {shared}")
    # The user's own text is saved as typed, line breaks and all (see docs/web-ui.md): several
    # lines are how kohya-ss (enable_wildcard) and OneTrainer take alternative captions.
    await write_caption(gallery, entry, source, text)
    return web.json_response(await gallery.run(gallery.catalog.item, entry))


def check_unicode(text: str) -> None:
    """400 for a caption UTF-8 cannot hold: a lone surrogate, which JSON lets a client send as a
    ``\\ud800`` escape without its pair (caption files are UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(
            "text",
            f"text has an unpaired surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}, "
            "which a UTF-8 caption file cannot hold; send the caption as valid Unicode.",
        ) from None


async def recaption(request: web.Request) -> web.Response:
    """``{"paths", "task", "save", "model"?}``: fresh captions through the engine's bulk lane
    (with ``model``, one of several served models; else the default), shown as a model source
    (and written to the ``.txt`` files when ``save`` on a writable gallery)."""
    gallery = request.app[GALLERY]
    body = await read_json_object(request)
    keys = paths_from(body)
    store = body.get("save", False)
    if not isinstance(store, bool):
        raise InvalidParameter("save", "save must be true or false.")
    if store and not gallery.catalog.writable:
        raise Forbidden(READ_ONLY)
    task_text = body.get("task")
    if not isinstance(task_text, str) or not task_text.strip():
        raise InvalidParameter("task", "task must name one of the model's tasks.")
    model = chosen_model(request, body.get("model"))
    task = normalize_task(task_text, model.tasks)
    entries = [await gallery.entry(key) for key in keys]  # every path checked before any work
    limit = asyncio.Semaphore(IN_FLIGHT)
    jobs = [
        asyncio.ensure_future(_recaption_one(request, entry, task, model.name, store, limit))
        for entry in entries
    ]
    try:
        results = await asyncio.gather(*jobs)
    finally:
        for job in jobs:
            job.cancel()  # after a failure (or the client leaving), the rest leave the queue
    items = [await gallery.run(gallery.catalog.item, entry) for entry in entries]
    return web.json_response({"task": task, "model": model.name, "results": results, "items": items})


async def _recaption_one(
    request: web.Request, entry: Entry, task: str, model: str, store: bool, limit: asyncio.Semaphore
) -> dict[str, Any]:
    """One image's result for :func:`recaption`: its caption (remembered as a source, and saved
    when ``store``), or the client-side reason it failed; a failure of ours fails the request."""
    gallery = request.app[GALLERY]
    shared = gallery.catalog.shared_file(entry, PRIMARY) if store else None
    if shared is not None:  # as every dataset tool: neither image is captioned
        return {"path": entry.key, "error": shared}
    async with limit:
        try:
            text = await caption_file(request, entry.path, task, model)
        except VisionServerError as exc:
            if exc.status >= 500:
                raise  # the server's trouble (draining, load failure): the whole request fails
            return {"path": entry.key, "error": exc.message}
        except OSError as exc:
            return {"path": entry.key, "error": f"cannot read the file: {describe_os_error(exc)}"}
    # A fresh caption is shown under its task; with several models, under the model's name too.
    label = task if len(request.app[ENGINE].model_names) == 1 else f"{model} {task}"
    gallery.catalog.remember(entry.key, label, text)
    if store:  # the model's caption on one line, as every dataset tool writes caption files
        try:
            await write_caption(gallery, entry, PRIMARY, one_line(text))
        except CaptionFileUnwritable as exc:  # the caption is kept as a model source all the same
            return {"path": entry.key, "task": task, "caption": text, "error": exc.message}
    return {"path": entry.key, "task": task, "caption": text}


async def caption_file(request: web.Request, path: Path, task: str, model: str | None = None) -> str:
    """One dataset image through the shared engine in the bulk lane (interactive requests go
    first), waiting for room in that lane rather than being refused; ``model`` as in
    :mod:`vision_server.api.captioning`."""
    limit = request.app[SETTINGS].max_request_bytes  # as large as an upload of it may be
    data = await asyncio.to_thread(read_at_most, path, limit, "--max-request-bytes")
    spec = spec_for(request.app, model)
    prepared = await request.app[DECODER].from_bytes(data, spec=spec, source=LOCAL_FILE)
    item = CaptionItem(image=prepared, task=task, options=request.app[SETTINGS].generation_defaults())
    labels = job_labels(request, default=Lane.BULK)  # behind interactive requests, unless asked
    result = await submit_item(request, item, labels, model, wait_for_room=True)
    return result.text


async def export(request: web.Request) -> web.StreamResponse:
    """``{"paths"}`` → one JSON line per image, in the order given (a download for the page)."""
    gallery = request.app[GALLERY]
    keys = paths_from(await read_json_object(request))
    entries = [await gallery.entry(key) for key in keys]
    rows = [await gallery.run(gallery.catalog.export_row, entry) for entry in entries]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    # A file name that is not UTF-8 (a zip from another system) reaches Python with lone
    # surrogates; written as JSON escapes, ``json.loads`` gives back the name the OS knows.
    response = web.Response(
        body=text.encode("utf-8", "backslashreplace"),
        charset="utf-8",
        content_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="captions.jsonl"'},
    )
    return await deliver(request, response)


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes (only with ``--gallery``); errors answer in the operations shape."""
    app[GALLERY] = gallery_from(app[SETTINGS])
    return [
        app.router.add_get("/ui/api/gallery", page, name="gallery.page"),
        app.router.add_get("/ui/api/gallery/thumb", thumbnail, name="gallery.thumb"),
        app.router.add_get("/ui/api/gallery/image", image, name="gallery.image"),
        app.router.add_post("/ui/api/gallery/save", save, name="gallery.save"),
        app.router.add_post("/ui/api/gallery/recaption", recaption, name="gallery.recaption"),
        app.router.add_post("/ui/api/gallery/export", export, name="gallery.export"),
    ]
