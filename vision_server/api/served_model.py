"""The ``X-Model`` header: which served model captioned, on every caption reply of every family.

The bodies stay each family's own (the native one byte for byte as florence2-visionapi's), so
the name travels in a header: a folder run records it, a browser page reads it (CORS exposes
it). A request is marked when its image is handed to a model (:func:`note_served_model`, in
:func:`vision_server.api.captioning.submit_item`, the one way in for every family and the
gallery); the header is added as the reply is
prepared, so streamed replies carry it too. Error replies carry none: no model captioned.
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from vision_server.api.state import ENGINE

MODEL_HEADER = "X-Model"  # the served name of the model that captioned (percent-encoded past ASCII)
SERVED_MODEL = web.RequestKey("served_model", str)


def note_served_model(request: web.Request, name: str | None) -> None:
    """Remember that ``name`` (None: the default model) captions this request's image."""
    request[SERVED_MODEL] = name if name is not None else request.app[ENGINE].default_model


def header_value(name: str) -> str:
    """A model name as a header value: a local source path may hold any character, a header not."""
    return quote(name, safe=" !\"#$&'()*+,/:;<=>?@[]^_`{|}~")


async def add_model_header(request: web.Request, response: web.StreamResponse) -> None:
    """Name the model on a successful caption reply (also a stream's, prepared before its end)."""
    name = request.get(SERVED_MODEL)
    if name is not None and response.status < 400:
        response.headers[MODEL_HEADER] = header_value(name)
