"""From an image a client sent to a caption, through the one shared engine.

Every API family goes through here, so their requests wait in the same queue and batch together.
``model`` is the served name the request picked (:mod:`vision_server.api.model_choice`; None:
the default model): the image is fitted to that model's input size and queued for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiohttp import web

from vision_server.api.errors import REQUEST_ID
from vision_server.api.model_choice import spec_for
from vision_server.api.scheduling import job_labels
from vision_server.api.served_model import note_served_model
from vision_server.api.state import DECODER, ENGINE
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.engine.jobs import JobLabels, Lane
from vision_server.errors import VisionServerError


async def caption_base64(
    request: web.Request,
    text: str,
    task: str,
    options: GenerationOptions,
    labels: JobLabels | None = None,
    prompt: str | None = None,
    *,
    model: str | None = None,
    stream: Callable[[str], None] | None = None,
) -> Caption:
    """Caption a base64 string or ``data:`` URL (decoded off the event loop).

    ``labels`` default to an interactive job of the request's client; ``prompt`` is free text for
    a model that reads it (:func:`vision_server.api.task_words.read_prompt`); ``stream`` gets the
    caption so far while it is generated (see :class:`CaptionItem`)."""
    return await _caption(request, text, task, options, labels, prompt, model, stream)


async def caption_bytes(
    request: web.Request,
    data: bytes,
    task: str,
    options: GenerationOptions,
    labels: JobLabels | None = None,
    prompt: str | None = None,
    *,
    model: str | None = None,
) -> Caption:
    """Caption an uploaded file's bytes (decoded off the event loop)."""
    return await _caption(request, data, task, options, labels, prompt, model)


async def caption_all_base64(
    request: web.Request,
    texts: Sequence[str],
    task: str,
    options: GenerationOptions,
    labels: JobLabels | None = None,
    prompt: str | None = None,
    *,
    model: str | None = None,
    where: Sequence[str] | None = None,
) -> list[Caption]:
    """Caption several images of one request, all or none: the first failure cancels the others
    (their queued jobs leave the queue), so a 400 or 503 leaves no captions behind. ``where``
    names each image as the request does; a refusal of one image then names it (``param``)."""
    tasks = [
        asyncio.ensure_future(caption_base64(request, text, task, options, labels, prompt, model=model))
        for text in texts
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t in done and not t.cancelled() and t.exception()), None)
        if failed is not None:
            error = failed.exception()
            if where is not None:
                name_image(error, where[tasks.index(failed)])
            raise error  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def name_image(error: BaseException | None, where: str) -> None:
    """Say which image a client error is about (a bad or oversized image, not a full queue)."""
    if isinstance(error, VisionServerError) and 400 <= error.status < 500 and error.param is None:
        error.param = where


async def _caption(
    request: web.Request,
    sent: str | bytes,
    task: str,
    options: GenerationOptions,
    labels: JobLabels | None,
    prompt: str | None,
    model: str | None,
    stream: Callable[[str], None] | None = None,
) -> Caption:
    """The one path for both kinds of image: refuse a full lane before any decoding, decode on
    the lane's pool at the picked model's size, then submit."""
    labels = labels or job_labels(request)
    request.app[ENGINE].check_room(labels.lane, model)
    spec = spec_for(request.app, model)
    decoder, bulk = request.app[DECODER], labels.lane is Lane.BULK
    if isinstance(sent, str):
        image = await decoder.from_base64(sent, bulk=bulk, spec=spec)
    else:
        image = await decoder.from_bytes(sent, bulk=bulk, spec=spec)
    item = CaptionItem(image=image, task=task, options=options, stream=stream, prompt=prompt)
    return await submit_item(request, item, labels, model)


async def submit_item(
    request: web.Request,
    item: CaptionItem,
    labels: JobLabels,
    model: str | None,
    *,
    wait_for_room: bool = False,
) -> Caption:
    """Hand a prepared item to the engine under the request's id; the reply names the model
    (``X-Model``), whatever the family. ``wait_for_room`` as :meth:`Engine.submit` has it."""
    request_id = request.get(REQUEST_ID, "-")
    note_served_model(request, model)
    return await request.app[ENGINE].submit(
        item, model=model, request_id=request_id, labels=labels, wait_for_room=wait_for_room
    )
