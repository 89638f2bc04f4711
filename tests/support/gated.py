"""Fake captioners that hold the worker inside a batch (or a load) until the test lets it go.

While it is held, later requests queue up, so a test can see how the next batch is formed
(lanes, batching), move a fake clock while a batch "runs", or know the work in progress has run
at least as long as it kept the gate shut.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from vision_server.captioner import Caption, CaptionItem, ModelInfo
from vision_server.testing.fake import FakeCaptioner


class GatedFake(FakeCaptioner):
    """Each batch waits in ``caption()`` until the test sets ``gate``; ``entered`` says one began."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gate, self.entered = threading.Event(), threading.Event()

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().caption(batch)


class GatedLoadFake(FakeCaptioner):
    """Its load waits in ``load()`` until the test sets ``load_gate``; ``loading`` says it began."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.load_gate, self.loading = threading.Event(), threading.Event()

    def load(self) -> ModelInfo:
        self.loading.set()
        assert self.load_gate.wait(30), "the test never let the load finish"
        return super().load()


class SlowToSize(FakeCaptioner):
    """Its first memory answer waits until the test sets ``sized`` (a cold config build takes
    seconds); it notes the thread of every ``memory_parts`` call in ``asked_on``, and never
    waits on the thread that made it (the event loop's), so a call there fails the test, not
    hangs it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sized = threading.Event()
        self.asked_on: list[threading.Thread] = []
        self.loop_thread = threading.current_thread()

    def memory_parts(self) -> dict[str, int]:
        here = threading.current_thread()
        self.asked_on.append(here)
        if here is not self.loop_thread:
            assert self.sized.wait(30), "the test never let the size be known"
        return super().memory_parts()


def gated_caption_command(*args: str | Path) -> list[str]:
    """``vision-server caption ARGS`` as ``tests/support/gated_caption.py`` runs it: the real
    command, held at the point ``CAPTION_GATE_AT`` names until the test opens the gate."""
    return [sys.executable, str(Path(__file__).with_name("gated_caption.py")), "caption", *map(str, args)]
