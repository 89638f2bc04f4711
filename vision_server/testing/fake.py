"""A deterministic stand-in captioner for scheduler tests that need to control time.

Everything else is tested against the real Florence-2 code on the tiny model; this fake exists
only where a test must make generation take a known time, fail on purpose, count calls, or get
a caption the tiny model cannot be made to write (``text``: line breaks, say).
"""

from __future__ import annotations

import hashlib
import threading
import time

from vision_server.captioner import Caption, CaptionItem, ModelInfo
from vision_server.errors import ModelLoadError
from vision_server.images import PixelSpec
from vision_server.tasks import PROMPTGEN_TASKS

# Small, so scheduler tests stay cheap; a fake "model" that looks at 16x16 images.
FAKE_SPEC = PixelSpec(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class FakeCaptioner:
    """Captions are a hash of the pixels and the task; ``delay`` seconds per batch."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        load_delay: float = 0.0,
        model_id: str = "fake-model",
        offloadable: bool = False,
        memory: dict[str, int] | None = None,
        tasks: tuple[str, ...] = PROMPTGEN_TASKS,
        spec: PixelSpec = FAKE_SPEC,
        text: str | None = None,
    ) -> None:
        self.delay = delay
        # every caption, when given (else a hash of the pixels and the task); with fail_caption,
        # what each stream gets before the failure
        self.text = text
        self.offloadable = offloadable  # pretend to run on a GPU with a warm tier
        self.offloaded = False
        self.offloads = 0
        self.wakes = 0
        self.load_delay = load_delay
        self.fail_load: str | None = None
        self.fail_caption: Exception | None = None
        self.loaded = False
        self.loads = 0
        self.unloads = 0
        self.trims = 0
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()
        self._model_id = model_id
        self._memory = dict(memory or {})  # what memory_parts() reports (for --memory-budget tests)
        self._tasks = tasks
        self._spec = spec
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    @property
    def takes_prompt(self) -> bool:
        return False

    @property
    def preferred_batch_size(self) -> int:
        return 16

    @property
    def pixel_spec(self) -> PixelSpec:
        return self._spec

    def memory_parts(self) -> dict[str, int]:
        return dict(self._memory)

    def load(self) -> ModelInfo:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.load_delay)
        if self.fail_load:
            raise ModelLoadError(self.fail_load)
        with self._lock:
            self.loaded = True
            self.loads += 1
        return ModelInfo(self._model_id, "cpu", "float32")

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.threads.add(threading.current_thread().name)
        assert self.loaded and not self.offloaded, "caption() called on an unloaded or offloaded model"
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay)
        if self.fail_caption is not None:
            for item in batch:  # a failure mid-generate: the text streamed so far was sent
                if item.stream is not None and self.text:
                    item.stream(self.text)
            raise self.fail_caption
        if self.text is not None:
            return [Caption(text=self.text) for _ in batch]
        return [Caption(text=self.expected(item, self._model_id)) for item in batch]

    def unload(self) -> None:
        self.threads.add(threading.current_thread().name)
        with self._lock:
            self.loaded = self.offloaded = False
            self.unloads += 1

    @property
    def can_offload(self) -> bool:
        return self.offloadable and self.loaded

    def offload(self) -> None:
        self.threads.add(threading.current_thread().name)
        assert self.loaded and not self.offloaded
        self.offloaded = True
        self.offloads += 1

    def restore(self) -> ModelInfo:
        self.threads.add(threading.current_thread().name)
        assert self.loaded and self.offloaded
        self.offloaded = False
        self.wakes += 1
        return ModelInfo(self._model_id, "cuda:0" if self.offloadable else "cpu", "float16")

    def trim_memory(self) -> None:
        self.threads.add(threading.current_thread().name)
        with self._lock:
            self.trims += 1

    @staticmethod
    def expected(item: CaptionItem, model_id: str = "fake-model") -> str:
        """The caption for ``item``: the model id takes part only when it is not the default, so
        two fakes of different names answer differently (several-model tests)."""
        salt = b"" if model_id == "fake-model" else model_id.encode()
        digest = hashlib.sha256(item.image.pixels.tobytes() + item.task.encode() + salt).hexdigest()[:12]
        return f"{item.task.strip('<>').lower()} {digest}"
