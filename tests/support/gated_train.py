"""``vision-server train`` as a real process that waits at one point until the test lets it go.

A checkpoint or the final adapter is written in a moment: a test that must kill the run (or start
a second one) while it happens cannot count on hitting it in time. Run as ``python gated_train.py
train ARGS``, with ``TRAIN_GATE`` naming a folder and ``TRAIN_GATE_AT`` the point: ``start``
(after the checks, before the model loads), ``checkpoint:N`` (inside the Nth checkpoint, its
adapter written but not its trainer state), ``final`` (inside the final adapter's write, its
weights in place but not its config) or ``logs`` (TensorBoard's writer thread, about to write the
first epoch's loss: the last value of a one-epoch run, written while the main thread goes on to
the adapter and then waits for it when it closes the logs). There the process makes
``<point>.entered`` in the folder and waits for ``<point>.open``, as ``gated_caption.py`` does.
Everything else is the real command's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tests.support.gated_caption import gated
from vision_server.cli import main
from vision_server.train import checkpoint, loop

if __name__ == "__main__":
    gate, at = Path(os.environ["TRAIN_GATE"]), os.environ["TRAIN_GATE_AT"]
    point = at.split(":")[0]
    if at == "start":
        loop.load_base = gated(gate, point, loop.load_base, lambda *_, **__: True)
    elif point == "checkpoint":
        seen: list[Path] = []

        def nth(directory: Path, _data: Any) -> bool:
            if directory.name.startswith(".step-"):
                seen.append(directory)
            return len(seen) == int(at.split(":")[1])

        checkpoint.write_metadata = gated(gate, point, checkpoint.write_metadata, nth)
    elif at == "final":
        Path.replace = gated(  # type: ignore[method-assign]
            gate,
            point,
            Path.replace,
            lambda source, _target: source.parent.name == ".final.partial" and source.name == "training.json",
        )
    elif at == "logs":
        from tensorboard.summary.writer.record_writer import RecordWriter

        RecordWriter.write = gated(
            gate, point, RecordWriter.write, lambda _writer, data: b"train/epoch_loss" in data
        )
    else:
        sys.exit(f"TRAIN_GATE_AT must be start, checkpoint:N, final or logs, not {at!r}")
    sys.argv[0] = "vision-server"
    main()
