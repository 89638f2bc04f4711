"""Operational routes: probes for load balancers and supervisors, status and metrics for people and tools.

``/health`` is liveness: 200 whenever the process can serve, including with the model unloaded
(idle unload is the normal state, and a pool must not eject an idle server). ``/ready`` is
readiness: 503 while starting or draining, so HAProxy stops sending work before a shutdown.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from vision_server.api.model_choice import adapter_of, shown_status
from vision_server.api.state import ENGINE, METRICS, STARTED_AT
from vision_server.engine.lifecycle import EngineStatus, ModelState
from vision_server.errors import VisionServerError
from vision_server.gpu import gpu_available, gpu_memory
from vision_server.model_specs import public_labels
from vision_server.train.metadata import adapter_summary


def ops_error(error: VisionServerError, request_id: str) -> web.Response:
    body = {"error": {"message": error.message, "code": error.code, "request_id": request_id}}
    return web.json_response(body, status=error.status)


def status_body(app: web.Application, status: EngineStatus) -> dict[str, Any]:
    """``/v1/status`` as clients see it, also in the admin routes' answers: the adapter and, for
    one made by ``vision-server train``, how it was trained, by name and never by path (see
    :func:`~vision_server.train.metadata.adapter_summary`); a local model by its served name and
    source ``"local"``, never its path (:func:`~vision_server.api.model_choice.shown_status`)."""
    data = status.as_dict()
    data["tasks"] = list(app[ENGINE].model_card.tasks)
    # the default model's, as before several models; each model's own under `models`
    data["adapter"] = adapter_summary(adapter_of(app, app[ENGINE].model_card))
    shown_status(app, data, training=True)
    return data


async def status(request: web.Request) -> web.Response:
    """State, model, device, dtype, loaded since, expires_at, queue depth, jobs running, errors."""
    return web.json_response(status_body(request.app, request.app[ENGINE].status()))


def memory_usage() -> dict[str, int | None]:
    """GPU bytes held by this process and the GPUs' size (None before CUDA is first used)."""
    devices = gpu_memory()
    if not devices:
        return {"gpu_memory_used": None, "gpu_memory_total": None}
    totals = [device.total for device in devices]
    return {
        "gpu_memory_used": sum(device.reserved for device in devices),
        "gpu_memory_total": None if None in totals else sum(t for t in totals if t is not None),
    }


async def health(request: web.Request) -> web.Response:
    """Liveness. 503 while the worker is dead (it is restarted) or gone without a shutdown."""
    engine = request.app[ENGINE]
    snapshot = engine.status()
    shown = public_labels(engine.model_names)
    if engine.draining:
        verdict = "draining"
    elif engine.running:
        verdict = "ok"
    else:
        verdict = "error"
    body = {
        "status": verdict,
        "worker": "down" if engine.worker_down else ("running" if engine.running else "stopped"),
        "worker_restarts": engine.worker_restarts,
        "model_loaded": snapshot.state is ModelState.READY,  # the default model
        # every served model that is loaded: with several, the default may be idle while others work
        # (an embedder's captioner named by a path shows its folder name: /health is open with a key too)
        "models_loaded": [shown[m.name] for m in snapshot.models if m.state is ModelState.READY],
        "gpu_available": gpu_available(),
        "memory_usage": memory_usage(),
        "uptime": round(time.time() - request.app[STARTED_AT], 3),
        "state": snapshot.state.value,
        "queue_depth": snapshot.queue_depth,
    }
    return web.json_response(body, status=503 if verdict == "error" else 200)


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when new work is welcome, 503 while starting or draining."""
    engine = request.app[ENGINE]
    if engine.draining:
        reason = "draining"
    elif engine.worker_down:
        reason = "worker_down"
    elif not engine.running:
        reason = "starting"
    else:
        return web.json_response({"ready": True, "state": engine.state.value})
    return web.json_response({"ready": False, "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (OpenMetrics when the scraper's Accept header asks for it)."""
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup(app: web.Application) -> list[AbstractRoute]:
    """Add the routes; :func:`vision_server.app.create_app` gives them this family's error shape."""
    return [
        app.router.add_get("/v1/status", status, name="ops.status"),
        app.router.add_get("/health", health, name="ops.health"),
        app.router.add_get("/ready", ready, name="ops.ready"),
        app.router.add_get("/metrics", metrics, name="ops.metrics"),
    ]
