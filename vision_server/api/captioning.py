"""From an image a client sent to a caption, through the one shared engine.

Every API family goes through here, so their requests wait in the same queue and batch together.
"""

from __future__ import annotations

from aiohttp import web

from vision_server.api.errors import REQUEST_ID
from vision_server.api.state import DECODER, ENGINE
from vision_server.captioner import Caption, CaptionItem, GenerationOptions


async def caption_base64(request: web.Request, text: str, task: str, options: GenerationOptions) -> Caption:
    """Caption a base64 string or ``data:`` URL (decoded off the event loop)."""
    image = await request.app[DECODER].from_base64(text)
    return await _submit(request, CaptionItem(image=image, task=task, options=options))


async def caption_bytes(request: web.Request, data: bytes, task: str, options: GenerationOptions) -> Caption:
    """Caption an uploaded file's bytes (decoded off the event loop)."""
    image = await request.app[DECODER].from_bytes(data)
    return await _submit(request, CaptionItem(image=image, task=task, options=options))


async def _submit(request: web.Request, item: CaptionItem) -> Caption:
    return await request.app[ENGINE].submit(item, request_id=request.get(REQUEST_ID, "-"))
