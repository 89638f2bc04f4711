"""ComfyUI node that captions images with a vision-server instead of loading Florence-2 itself.

The model stays in the daemon (possibly on another machine or GPU), which loads it on demand and
frees the VRAM when idle, so the ComfyUI workflow never holds captioning weights. This file is
copied into ComfyUI's ``custom_nodes``, where only the standard library, numpy and Pillow can be
relied on; it must not import the ``vision_server`` package. Everything below the node class is
plain functions that work on numpy arrays and can be tested without ComfyUI.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:54880"
TASKS = (
    "<GENERATE_TAGS>",
    "<CAPTION>",
    "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>",
    "<ANALYZE>",
    "<MIXED_CAPTION>",
    "<MIXED_CAPTION_PLUS>",
)
RETRY_STATUSES = (429, 502, 503)
# The retry schedule of every client (docs/clients/index.md#retries; vision_server/client/retry.py
# says the same, which this file may not import): the server's Retry-After up to 120 s plus up
# to a tenth more, else 0.5 s doubling up to 30 s, each wait between half of that and all of it.
RETRIES = 5
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 30.0
RETRY_AFTER_MAX = 120.0
# Retry-After in seconds: digits, a fraction or a sign allowed (as retry.py's _SECONDS).
_SECONDS = re.compile(r"[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)", re.ASCII)
URL_TIP = "The vision-server's base URL (host:port works too); empty: $VISION_HOST."
API_KEY_TIP = (
    "Better left empty: start ComfyUI with VISION_API_KEY set instead. A key typed here is saved "
    "in the workflow and in the metadata of every image ComfyUI saves."
)
MAX_PARALLEL = 8  # requests in flight per batch; the server batches them on its GPU


class VisionServerCaption:
    """Caption each image of a batch; outputs the captions joined by newlines and as a list."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # the name ComfyUI looks up
        return {
            "required": {
                "image": ("IMAGE",),
                "task": (list(TASKS), {"default": "<MORE_DETAILED_CAPTION>"}),
                "server_url": (
                    "STRING",
                    {"default": DEFAULT_URL, "multiline": False, "tooltip": URL_TIP},
                ),
            },
            "optional": {
                # A key typed here is a widget value: ComfyUI saves it in the workflow and in
                # every PNG it writes. Left empty, the key comes from ComfyUI's environment.
                "api_key": ("STRING", {"default": "", "multiline": False, "tooltip": API_KEY_TIP}),
                "timeout": ("INT", {"default": 600, "min": 1, "max": 3600, "step": 1}),
                # which of the server's models captions; empty: the server's default model
                "model": ("STRING", {"default": "", "multiline": False}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("caption", "captions")
    OUTPUT_IS_LIST = (False, True)
    FUNCTION = "caption"
    CATEGORY = "image/caption"
    DESCRIPTION = "Caption images with a vision-server (Florence-2 PromptGen) over HTTP."

    def caption(
        self, image: Any, task: str, server_url: str, api_key: str = "", timeout: int = 600, model: str = ""
    ) -> tuple[str, list[str]]:
        captions = caption_batch(image, task, server_url, api_key=api_key, timeout=timeout, model=model)
        return "\n".join(captions), captions


def to_numpy_batch(images: Any) -> np.ndarray:
    """A ComfyUI IMAGE (torch tensor or array, [B,H,W,C] or [H,W,C], floats 0..1) as a numpy batch."""
    if hasattr(images, "detach"):  # a torch tensor; torch itself is not imported here
        images = images.detach().cpu().float().numpy()
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image batch shaped [B,H,W,C] with C in 1, 3, 4; got {batch.shape}")
    return batch


def png_bytes(image: np.ndarray) -> bytes:
    """One [H,W,C] float image as PNG; lossless, and fast at compression level 1."""
    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def task_token(task: str) -> str:
    """``caption`` or ``<CAPTION>`` -> ``<CAPTION>``."""
    token = task.strip().upper()
    return token if token.startswith("<") else f"<{token}>"


def server_base(server_url: str) -> str:
    """The server's base URL: ``gpu-box:54880`` gets ``http://`` as in every other client;
    empty means ``$VISION_HOST``, else the default."""
    base = (server_url.strip() or os.environ.get("VISION_HOST", "").strip() or DEFAULT_URL).rstrip("/")
    return base if "://" in base else f"http://{base}"


def api_key_for(api_key: str) -> str:
    """The node's key, else ``$VISION_API_KEY`` (kept out of the workflow and image metadata)."""
    return api_key.strip() or os.environ.get("VISION_API_KEY", "").strip()


def request_caption(
    png: bytes,
    task: str,
    server_url: str,
    *,
    api_key: str = "",
    timeout: float = 600,
    retries: int = RETRIES,
    model: str = "",
) -> str:
    """POST one image to ``/process_image`` (for ``model``, else the server's default model);
    retry busy answers and lost connections, and say in every other failure what to fix."""
    base = server_base(server_url)
    url = base + "/process_image"
    fields = {"image": base64.b64encode(png).decode("ascii"), "prompt": task_token(task)}
    if model.strip():
        fields["model"] = model.strip()
    body = json.dumps(fields).encode()
    headers = {"Content-Type": "application/json"}
    key = api_key_for(api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _caption_of(response.read(), base)
        except urllib.error.HTTPError as exc:
            detail = _detail(exc.read())
            if exc.code == 401:  # say where this node takes the key from
                detail += " (start ComfyUI with VISION_API_KEY set, or fill in the node's api_key)"
            if exc.code not in RETRY_STATUSES or attempt == retries:
                raise RuntimeError(f"vision-server at {base} answered {exc.code}: {detail}") from None
            time.sleep(_retry_delay(exc.headers.get("Retry-After"), attempt))
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLError):  # the same certificate fails every time
                raise RuntimeError(_tls_failure(base, exc.reason)) from None
            if attempt == 0 and isinstance(exc.reason, Exception):
                _check_scheme(base, exc.reason)
            if attempt == retries:
                raise RuntimeError(f"cannot reach vision-server at {base}: {exc.reason}") from None
            time.sleep(_retry_delay(None, attempt))
        except TimeoutError:  # no answer in time: the server may still be at work, so no resend
            raise RuntimeError(
                f"vision-server at {base} did not answer within {timeout:g} s; raise the node's "
                "timeout (a long queue or a cold model load counts)"
            ) from None
        except (ConnectionError, http.client.HTTPException) as exc:  # lost after it was sent
            if attempt == 0:
                _check_scheme(base, exc)
            if attempt == retries:
                raise RuntimeError(f"the connection to vision-server at {base} broke: {exc!r}") from None
            time.sleep(_retry_delay(None, attempt))
    raise AssertionError("unreachable")


def caption_batch(
    images: Any,
    task: str,
    server_url: str = DEFAULT_URL,
    *,
    api_key: str = "",
    timeout: float = 600,
    model: str = "",
) -> list[str]:
    """Caption every image of a batch, in order, sending them in parallel so the server batches."""
    batch = to_numpy_batch(images)
    pngs = [png_bytes(image) for image in batch]

    def one(png: bytes) -> str:
        return request_caption(png, task, server_url, api_key=api_key, timeout=timeout, model=model)

    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(pngs))) as pool:
        return list(pool.map(one, pngs))


def _caption_of(body: bytes, base: str) -> str:
    """The ``result`` of a 200 answer; anything else means the URL is not a vision-server."""
    try:
        return str(json.loads(body)["result"]).strip()
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(
            f"{base} answered without a caption ({body[:80]!r}); is server_url a vision-server?"
        ) from None


def _check_scheme(base: str, error: Exception) -> None:
    """Plain HTTP to a TLS port is hung up on (or reset) unanswered, and every retry would be too:
    on the first such failure, find out whether the port speaks HTTPS and say so."""
    hung_up = isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError))
    if hung_up and _speaks_tls(base):
        raise RuntimeError(
            f"vision-server at {base} hung up without an answer, and that port speaks HTTPS: set "
            f"server_url to https://{base.removeprefix('http://')}"
        ) from None


def _speaks_tls(base: str, timeout: float = 5.0) -> bool:
    """Whether an ``http://`` base URL's port completes a TLS handshake (the certificate is not
    checked: this only asks which protocol the port speaks, and nothing is sent over it)."""
    if not base.startswith("http://"):
        return False
    parts = urllib.parse.urlsplit(base)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        address = (parts.hostname or "", parts.port or 80)
        with socket.create_connection(address, timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except (OSError, ValueError):
        return False


def _tls_failure(base: str, error: ssl.SSLError) -> str:
    """Why HTTPS failed, and what fixes it."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"the TLS certificate of {base} is not trusted ({error.verify_message}); for a "
            "self-signed certificate or a private CA, start ComfyUI with SSL_CERT_FILE=/path/to/ca.pem"
        )
    return f"the TLS handshake with {base} failed ({error}); a server without --ssl-cert needs http://"


def _detail(body: bytes) -> str:
    """The server's explanation from ``{"detail": ...}``, or the raw body."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "no detail"
    if isinstance(data, dict) and data.get("detail"):
        return str(data["detail"])
    return text.strip()[:300]


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds, read as vision_server/client/retry.py reads it (this file may
    not import it): a number of seconds (ASCII digits, a fraction and a sign allowed; not
    ``float()``'s "1e3" or "inf"), or an HTTP date in any of RFC 9110's three forms (the time
    until then, 0 when past); ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime's form names no zone: HTTP dates are in UTC
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    """Seconds before retry ``attempt`` (0 first): Retry-After (seconds or an HTTP date) honoured
    up to ``RETRY_AFTER_MAX``, else the back-off, both with jitter so parallel requests spread out."""
    hint = _retry_after_seconds(retry_after)
    if hint is not None:
        wait = min(hint, RETRY_AFTER_MAX)
        return wait + random.uniform(0, 0.1 * wait + 0.05)
    backoff = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** min(attempt, 16))
    return random.uniform(backoff / 2, backoff)
