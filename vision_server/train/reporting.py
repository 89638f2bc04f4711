"""What a run shows: a progress bar (loss, learning rate, steps/s), lines in logs, and metrics for
TensorBoard or wandb when one of them is installed and chosen."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import IO, Any

from vision_server.disk_full import as_disk_full, is_disk_full
from vision_server.progress_output import ProgressOutput


class LoggerUnavailable(RuntimeError):
    """``--log-with`` names a tracker that is not installed."""


def pick_tracker(requested: str) -> str:
    """``auto`` is TensorBoard when installed, else nothing; an explicit choice must be installed."""
    if requested == "auto":
        return "tensorboard" if _installed("tensorboard") else "none"
    if requested == "tensorboard" and not _installed("tensorboard"):
        raise LoggerUnavailable(
            "--log-with tensorboard needs TensorBoard: pip install 'vision-server[train]'"
        )
    if requested == "wandb" and not _installed("wandb"):
        raise LoggerUnavailable("--log-with wandb needs wandb: pip install wandb")
    return requested


def counted(number: int, word: str) -> str:
    """``1 step``, ``2 steps``: a count with its word in the right number (regular plurals only)."""
    return f"{number} {word}" if number == 1 else f"{number} {word}s"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _quiet_full_disk_in_writer_threads() -> None:
    """TensorBoard's writer thread dies on a full disk with a traceback of its own; the main
    thread meets the same error on its next call and says it once, plainly. Other threads'
    errors are shown as before."""
    previous = threading.excepthook
    if getattr(previous, "quiet_full_disk", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if is_disk_full(args.exc_value) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.quiet_full_disk = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Tracker:
    """Scalars to TensorBoard (``OUTPUT/logs``) or wandb (which honours WANDB_MODE=offline).

    A full disk met while writing them is a :class:`~vision_server.disk_full.DiskFull` naming
    this run's events file (or the logs' folder before there is one); TensorBoard's writer
    thread reports it on a later call, the last one being :meth:`close`."""

    def __init__(self, kind: str, output: Path, config: dict[str, Any]) -> None:
        self.kind = kind
        self.name = {"tensorboard": "TensorBoard", "wandb": "wandb"}.get(kind, kind)
        self._writer: Any = None
        self._run: Any = None
        self._logs = output / "logs" if kind == "tensorboard" else output / "wandb"
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                _quiet_full_disk_in_writer_threads()
                earlier = _event_files(self._logs)  # a resumed run's folder holds the first part's
                self._writer = SummaryWriter(log_dir=str(self._logs))
                made = _event_files(self._logs) - earlier
                self._logs = made.pop() if len(made) == 1 else self._logs
            elif kind == "wandb":
                wandb = importlib.import_module("wandb")  # optional: only where installed
                self._run = wandb.init(project="vision-server-train", dir=str(output), config=config)
        except OSError as exc:
            raise as_disk_full(self._logs, exc) from None

    def log(self, step: int, values: dict[str, float]) -> None:
        try:
            if self._writer is not None:
                for name, value in values.items():
                    self._writer.add_scalar(name, value, step)
            elif self._run is not None:
                self._run.log(values, step=step)
        except OSError as exc:
            raise as_disk_full(self._logs, exc) from None

    def close(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._run is not None:
                self._run.finish()
        except OSError as exc:
            raise as_disk_full(self._logs, exc) from None


def _event_files(folder: Path) -> set[Path]:
    return set(folder.glob("events.out.tfevents.*")) if folder.is_dir() else set()


class Progress(ProgressOutput):
    """A tqdm bar on a terminal; elsewhere a plain line every ``interval`` seconds (and at the end)."""

    def __init__(self, total: int, initial: int = 0, stream: IO[str] | None = None, interval: float = 10.0):
        super().__init__(stream, interval, total=total, initial=initial, unit="step")
        self.total = total
        self.step = initial
        self._started = time.monotonic()
        self._first = initial

    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self.step - self._first) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float, lr: float) -> None:
        done, self.step = step - self.step, step
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.line_due() or step == self.total:
            self.write(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {self.rate():.2f} steps/s")
