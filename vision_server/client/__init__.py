"""Python client for vision-server: single images, whole folders, and the ``vision-client`` CLI.

>>> from vision_server.client import VisionClient
>>> with VisionClient("http://127.0.0.1:54880") as client:
...     print(client.caption("cat.png", task="caption"))  # doctest: +SKIP

The package needs only aiohttp (and tqdm for the CLI's progress bar); it never imports torch.
"""

from vision_server.captionfiles import IMAGE_EXTENSIONS, MODES, find_images
from vision_server.client.api import DEFAULT_TASK, DEFAULT_URL, AsyncVisionClient, CaptionResult, task_token
from vision_server.client.errors import (
    AuthenticationError,
    MalformedReply,
    RequestRejected,
    ServerBusy,
    ServerError,
    VisionAddressError,
    VisionClientError,
    VisionConnectionError,
    VisionHTTPError,
    VisionTimeoutError,
    VisionTLSError,
)
from vision_server.client.folder import Failure, FolderSummary, ImageResult, caption_folder
from vision_server.client.retry import RetryPolicy
from vision_server.client.sync import VisionClient

__all__ = [
    "DEFAULT_TASK",
    "DEFAULT_URL",
    "IMAGE_EXTENSIONS",
    "MODES",
    "AsyncVisionClient",
    "AuthenticationError",
    "CaptionResult",
    "Failure",
    "FolderSummary",
    "ImageResult",
    "MalformedReply",
    "RequestRejected",
    "RetryPolicy",
    "ServerBusy",
    "ServerError",
    "VisionAddressError",
    "VisionClient",
    "VisionClientError",
    "VisionConnectionError",
    "VisionHTTPError",
    "VisionTLSError",
    "VisionTimeoutError",
    "caption_folder",
    "find_images",
    "task_token",
]
