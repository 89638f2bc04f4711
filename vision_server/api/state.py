"""Typed application state shared by the API families."""

from __future__ import annotations

from aiohttp import web

from vision_server.api.uploads import Uploads
from vision_server.engine.recent import RecentBatches
from vision_server.engine.scheduler import Engine
from vision_server.images import ImageDecoder
from vision_server.metrics import Metrics
from vision_server.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
DECODER = web.AppKey("decoder", ImageDecoder)
STARTED_AT = web.AppKey("started_at", float)
METRICS = web.AppKey("metrics", Metrics)
RECENT = web.AppKey("recent_batches", RecentBatches)
UPLOADS = web.AppKey("uploads", Uploads)
