"""A caption saved while a folder run goes (in the gallery, or by another run), as real files.

A skip-mode run is planned at its start, maybe hours before it reaches an image; the folder
captioners must leave such a caption as it is. These helpers pause a real run mid-way and save
the captions, for the tests of each captioner.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tests.support.bulk_data import picture


def folder_of_images(root: Path, count: int) -> list[Path]:
    root.mkdir()
    images = [root / f"img{n:02d}.png" for n in range(count)]
    for n, image in enumerate(images):
        image.write_bytes(picture(n))
    return images


def save_by_hand(target: Path) -> str:
    """Save a caption as ``target``, as the gallery saves one: a whole file renamed into place."""
    text = f"hand-written caption of {target.stem}"
    staged = target.with_name(f".staged-{target.stem}")
    staged.write_text(text, encoding="utf-8")
    staged.replace(target)
    return text


def make_pipe(target: Path) -> str:
    """A named pipe as ``target`` (an unpacked archive can hold one): no caption, to be left alone."""
    os.mkfifo(target)
    return "a pipe"


def make_folder(target: Path) -> str:
    """A folder as ``target`` (a user's mkdir, an unpacked archive): no caption, to be left alone."""
    target.mkdir()
    return "a folder"


def write_captions_while_paused(
    run: subprocess.Popen[str],
    images: list[Path],
    *,
    group: bool = False,
    place: Callable[[Path], str] = save_by_hand,
) -> dict[Path, str]:
    """Once ``run`` has written its first caption file, pause it (its work in flight; with
    ``group``, its whole process group, a script's workers too) and ``place`` a file where every
    image's caption it has not written yet goes (by default a caption saved as the gallery saves
    one). Returns what was placed, to check it stays; the run goes on afterwards."""

    def send(signum: int) -> None:
        if group:
            os.killpg(run.pid, signum)
        else:
            run.send_signal(signum)

    deadline = time.monotonic() + 300
    while not any(image.with_suffix(".txt").exists() for image in images):
        assert run.poll() is None, run.stderr.read() if run.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    send(signal.SIGSTOP)
    hand: dict[Path, str] = {}
    try:
        for image in images:
            target = image.with_suffix(".txt")
            if not target.exists():
                hand[target] = place(target)
    finally:
        send(signal.SIGCONT)
    assert hand, "the run was over before it could be paused"
    return hand


class MeanwhileRun(NamedTuple):
    """How a run went whose captions were partly saved by hand while it was paused."""

    returncode: int
    stdout: str
    stderr: str
    hand: dict[Path, str]


def run_with_captions_written_meanwhile(
    command: list[str],
    env: dict[str, str],
    images: list[Path],
    *,
    group: bool = False,
    place: Callable[[Path], str] = save_by_hand,
) -> MeanwhileRun:
    """Run ``command`` over ``images``' folder to its end, saving captions by hand (or another
    ``place``) while it is paused (:func:`write_captions_while_paused`; with ``group`` in a
    process group of its own, like a terminal job, so a script's workers pause too)."""
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        start_new_session=group,
    ) as run:
        hand = write_captions_while_paused(run, images, group=group, place=place)
        stdout, stderr = _finish(run, group=group)
    return MeanwhileRun(run.returncode, stdout, stderr, hand)


def _finish(run: subprocess.Popen[str], *, group: bool) -> tuple[str, str]:
    """``run``'s output once it ends. A group's member can miss the SIGCONT (seen once: a
    script's worker, stopped while bash started it, stayed stopped and the run never ended), so
    while a group runs it is sent SIGCONT again each second; a running process ignores it."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return run.communicate(timeout=1 if group else 300)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise
            with contextlib.suppress(ProcessLookupError):  # gone: communicate returns next time
                os.killpg(run.pid, signal.SIGCONT)
