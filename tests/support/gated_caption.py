"""``vision-server caption`` as a real process that waits at one point until the test lets it go.

Some states of a run last a moment: the engine being built (the model or adapter could change on
disk just then), a caption being written (a stop waits for it). A test that must act in such a
state cannot count on hitting it in time. Run as ``python gated_caption.py caption ARGS``, with
``CAPTION_GATE`` naming a folder and ``CAPTION_GATE_AT`` the point: ``build`` (before the first
engine is built) or ``write`` (before the first image the model captioned is written). There the
process makes ``<point>.entered`` in the folder and waits for the test to make ``<point>.open``.
Everything else (the model, files, signals, exit status) is the real command's.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vision_server import runtime
from vision_server.bulk import pipeline
from vision_server.cli import main

GATE_TIMEOUT = 600.0  # a test that never opens the gate must not leave the process behind for ever


def wait_at_gate(folder: Path, point: str) -> None:
    (folder / f"{point}.entered").touch()
    deadline = time.monotonic() + GATE_TIMEOUT
    while not (folder / f"{point}.open").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def gated(
    folder: Path, point: str, inner: Callable[..., Any], when: Callable[..., bool]
) -> Callable[..., Any]:
    """``inner``, which waits at the gate the first time ``when`` says so of its arguments."""
    passed: list[bool] = []

    @functools.wraps(inner)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not passed and when(*args, **kwargs):
            passed.append(True)
            wait_at_gate(folder, point)
        return inner(*args, **kwargs)

    return call


if __name__ == "__main__":
    gate, at = Path(os.environ["CAPTION_GATE"]), os.environ["CAPTION_GATE_AT"]
    if at == "build":  # the engine factory imports it from runtime when it is called
        runtime.build_captioner = gated(gate, at, runtime.build_captioner, lambda *_, **__: True)
    elif at == "write":  # the pipeline's writer thread calls it by this module's name
        pipeline.write_all = gated(
            gate, at, pipeline.write_all, lambda _outputs, _record, captions, _error: bool(captions)
        )
    else:
        sys.exit(f"CAPTION_GATE_AT must be build or write, not {at!r}")
    sys.argv[0] = "vision-server"
    main()
