"""``stream: true`` for OpenAI's APIs: tokens as they are generated, as server-sent events.

One image with greedy or sampled decoding streams token by token, also when it shares its batch
with other requests (the model layer's batch-aware streamer calls back with each row's caption
so far, from the model thread; :func:`stream_captions` hops to the event loop and sends the
new part). Beam search, several images, and tasks whose answer is not plain text stream the
whole caption in one piece once it is done.

What is sent at each step is the API's own: chat completion chunks ending in ``data: [DONE]``
(:class:`~vision_server.api.openai_replies.ChatChunks`) or the Responses API's named events
(:class:`~vision_server.api.openai_response_objects.ResponseEvents`); both follow
:class:`StreamShape`.

Nothing is sent before the first piece of text (or the caption) exists, so a refusal (full
queue, bad image, failed load) is still a plain HTTP error that SDKs retry. A failure after the
stream began ends it with the shape's error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from aiohttp import web

from vision_server.api.access import left_early
from vision_server.api.captioning import caption_all_base64, caption_base64, name_image
from vision_server.api.errors import ERROR_CODE, REQUEST_ID
from vision_server.api.openai_replies import error_body, joined_text
from vision_server.captioner import Caption, GenerationOptions
from vision_server.engine.jobs import JobLabels
from vision_server.errors import VisionServerError

log = logging.getLogger(__name__)

Event = dict[str, Any]


class StreamShape(Protocol):
    """The events one API streams at each step of a caption."""

    named: bool  # each event also on an ``event:`` line, named by its ``type`` (Responses API)
    done_marker: bool  # ``data: [DONE]`` at the end (chat completions)

    def opening(self) -> list[Event]:
        """What goes before the first text."""
        ...

    def delta(self, text: str) -> list[Event]:
        """A new piece of the caption."""
        ...

    def closing(self, captions: list[Caption]) -> list[Event]:
        """The end, once every piece was sent: ``captions`` are the finished captions."""
        ...

    def failure(self, error: dict[str, Any]) -> list[Event]:
        """The end of a stream whose caption failed; ``error`` is an OpenAI error object."""
        ...


class EventStream:
    """A server-sent event response, opened when the first event is ready."""

    def __init__(self, request: web.Request, shape: StreamShape) -> None:
        self.request = request
        self.shape = shape
        self.response: web.StreamResponse | None = None

    @property
    def opened(self) -> bool:
        return self.response is not None

    async def send(self, *events: Event) -> None:
        """Send events (opening the response first); ConnectionResetError when the client left."""
        if self.response is None:
            self.response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Request-ID": self.request.get(REQUEST_ID, "-"),
                }
            )
            await self.response.prepare(self.request)
        for event in events:
            name = f"event: {event['type']}\n" if self.shape.named else ""
            line = f"{name}data: {json.dumps(event, ensure_ascii=False)}\n\n"
            # A lone surrogate (a client's "\\ud800" echoed in a Responses field) has no UTF-8:
            # written as the JSON escape it came in as, it keeps the stream valid.
            await self.response.write(line.encode("utf-8", "backslashreplace"))

    def left(self) -> web.StreamResponse:
        """The response of a stream whose client went away (:func:`~vision_server.api.access.left_early`)."""
        assert self.response is not None
        left_early(self.request)
        return self.response

    async def close(self) -> web.StreamResponse:
        assert self.response is not None
        if self.shape.done_marker:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


async def stream_captions(
    request: web.Request,
    images: tuple[str, ...],
    where: tuple[str, ...],
    task: str,
    options: GenerationOptions,
    labels: JobLabels,
    prompt: str | None = None,
    *,
    model: str,
    shape: StreamShape,
) -> web.StreamResponse:
    """Caption ``images`` with the served model ``model`` and stream the answer in ``shape`` (token
    by token where it can); ``prompt`` is free text for a model that reads it."""
    events = EventStream(request, shape)
    if len(images) != 1:
        captions = await caption_all_base64(
            request, images, task, options, labels, prompt, model=model, where=where
        )
        try:
            await events.send(*shape.opening(), *shape.delta(joined_text(captions)), *shape.closing(captions))
            return await events.close()
        except ConnectionResetError:  # the client left as its captions were done: nobody to tell
            return events.left()
    try:
        caption, sent = await _stream_caption(
            request, events, images[0], task, options, labels, prompt, model
        )
    except ConnectionResetError:  # the client left mid-stream: its job was withdrawn
        return events.left()
    except Exception as exc:
        if not events.opened:
            name_image(exc, where[0])
            raise  # nothing sent yet: a plain HTTP error, as for any request
        await _end_with_error(request, events, exc)
        return await events.close()
    rest = caption.text[len(sent) :] if caption.text.startswith(sent) else ""
    if not caption.text.startswith(sent):
        log.warning("streamed text is not a prefix of the caption (request %s)", request.get(REQUEST_ID, "-"))
    try:
        if not events.opened:
            await events.send(*shape.opening())
        await events.send(*(shape.delta(rest) if rest else []), *shape.closing([caption]))
        return await events.close()
    except ConnectionResetError:
        return events.left()


async def _stream_caption(
    request: web.Request,
    events: EventStream,
    image: str,
    task: str,
    options: GenerationOptions,
    labels: JobLabels,
    prompt: str | None,
    model: str,
) -> tuple[Caption, str]:
    """Caption one image, sending each new piece of text as it comes; the caption and what was sent."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[str] = asyncio.Queue()

    def on_text(text: str) -> None:  # called in the model thread
        loop.call_soon_threadsafe(updates.put_nowait, text)

    job = asyncio.ensure_future(
        caption_base64(request, image, task, options, labels, prompt, model=model, stream=on_text)
    )
    sent = ""
    try:
        while True:
            text = await _next_update(updates, job)
            if text is None:
                return job.result(), sent
            if len(text) <= len(sent) or not text.startswith(sent):
                continue
            if not events.opened:
                await events.send(*events.shape.opening())
            await events.send(*events.shape.delta(text[len(sent) :]))
            sent = text
    finally:
        # Also when the job is done: a failure that came just as the client left (this handler
        # cancelled before it read the job) would be logged as "Task exception was never retrieved".
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def _next_update(updates: asyncio.Queue[str], job: asyncio.Future[Caption]) -> str | None:
    """The next caption-so-far, or None once the job is done and every update was taken."""
    while updates.empty():
        if job.done():
            return None
        getter: asyncio.Future[Any] = asyncio.ensure_future(updates.get())
        try:
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
        finally:
            # Also when the handler itself is cancelled (the client left): a getter left pending
            # would be destroyed with the queue ("Task was destroyed but it is pending!").
            if not getter.done():
                getter.cancel()
    return updates.get_nowait()


async def _end_with_error(request: web.Request, events: EventStream, exc: Exception) -> None:
    """Tell a client whose stream already began that its caption failed."""
    request_id = request.get(REQUEST_ID, "-")
    if isinstance(exc, VisionServerError):
        log.warning("stream %s failed: %s", request_id, exc.message, extra={"request_id": request_id})
        error = error_body(exc)["error"]
    else:
        log.error("stream %s failed", request_id, exc_info=exc, extra={"request_id": request_id})
        message = f"Internal server error (request id {request_id})."
        error = {"message": message, "type": "api_error", "param": None, "code": "internal_error"}
    request[ERROR_CODE] = str(error["code"])  # the access line of a 200 whose stream failed says so
    await events.send(*events.shape.failure(error))
