"""A blocking client for scripts and notebooks, built on the asyncio one.

It runs its own event loop in a background thread, so it works the same whether or not the
caller already has a loop running (Jupyter does), and one aiohttp session with its keep-alive
connections lives across calls instead of being rebuilt by an ``asyncio.run`` per call.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vision_server.client.api import (
    DEFAULT_TASK,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    AsyncVisionClient,
    CaptionResult,
    ImageInput,
)
from vision_server.client.folder import FolderSummary, caption_folder
from vision_server.client.retry import DEFAULT_RETRIES

T = TypeVar("T")


class VisionClient:
    """Blocking twin of :class:`AsyncVisionClient`; use ``with`` or call :meth:`close`.

    One that is simply dropped (``client = VisionClient(url)`` in a notebook or a script that
    never closes it) closes itself when it is garbage-collected or the interpreter exits, so its
    connections do not end as aiohttp's "Unclosed client session" warnings on stderr.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        **kwargs: Any,
    ) -> None:
        self._client = AsyncVisionClient(base_url, api_key, timeout, retries, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vision-client", daemon=True)
        self._thread.start()
        # Holds no reference to self, so a dropped client can be collected and then closed.
        self._closer = weakref.finalize(self, _shut_down, self._client, self._loop, self._thread)

    @property
    def base_url(self) -> str:
        return self._client.base_url

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the background loop; safe to call twice."""
        self._closer()

    def caption(self, image: ImageInput, task: str = DEFAULT_TASK, *, priority: str | None = None) -> str:
        """Caption one image (bytes or a file path); ``priority`` as in :meth:`AsyncVisionClient.caption`."""
        return self._run(self._client.caption(image, task, priority=priority))

    def caption_result(
        self, image: ImageInput, task: str = DEFAULT_TASK, *, priority: str | None = None
    ) -> CaptionResult:
        """As :meth:`caption`, with the name of the served model that answered."""
        return self._run(self._client.caption_result(image, task, priority=priority))

    def prompts(self) -> list[str]:
        """The task tokens the loaded model understands."""
        return self._run(self._client.prompts())

    def model(self) -> str:
        """The model the server is configured with."""
        return self._run(self._client.model())

    def status(self) -> dict[str, Any]:
        """The server's ``/v1/status`` object."""
        return self._run(self._client.status())

    def caption_folder(self, folder: str | Path, **options: Any) -> FolderSummary:
        """Caption a folder; takes the keyword options of :func:`caption_folder`."""
        return self._run(caption_folder(self._client, folder, **options))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the background loop and wait; Ctrl+C cancels it there too."""
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("VisionClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


def _shut_down(client: AsyncVisionClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Close ``client``'s connections on its loop, then stop the loop and its thread (once)."""
    if loop.is_closed():
        return
    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(client.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    loop.close()
