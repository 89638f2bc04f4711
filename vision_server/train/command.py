"""The ``vision-server train`` click command: options in, :func:`run_training` out, exit codes.

Exit status: 0 trained, 1 the dataset or model cannot be used (or an image changed during the
run, or the disk filled up: the message names the file and the checkpoint kept), 2 bad usage,
130/143 when stopped by Ctrl+C/SIGTERM (after a checkpoint is written: ``--resume`` continues it).
Logs that could not be finished after the adapter (or that checkpoint) was written are a warning,
not a failure: the work is kept whole.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from vision_server.settings import env_name
from vision_server.train.options import (
    DEFAULT_CACHE_DIR,
    DEFAULT_MODEL,
    DEFAULT_TASK,
    LANGUAGE_TARGETS,
    TrainOptions,
)


def _val_split(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter("a fraction below 1 (0.1) or a count of images (20)") from None
    if number < 0 or (number >= 1 and not number.is_integer()):
        raise click.BadParameter("a fraction below 1 (0.1) or a whole count of images (20)")
    return number


def _targets(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise click.BadParameter("name at least one layer, e.g. q_proj,v_proj")
    return names


PARAMS: list[Callable[[Any], Any]] = [
    click.option("--dataset", type=click.Path(path_type=Path, exists=True), required=True,
                 help="A folder of images with caption files beside them (hidden files and folders left "
                 "out), a .jsonl of {\"file\", \"text\"} "
                 "rows (or the bulk captioner's JSONL), or a .parquet table with an image and a text "
                 "column."),
    click.option("--output", type=click.Path(path_type=Path, file_okay=False), required=True,
                 help="Folder for the adapter, checkpoints and logs; must not exist unless --overwrite "
                 "or --resume."),
    click.option("--model", metavar="SOURCE",
                 help="Base model: hub id, local folder or test:tiny. As for serve: without it, the "
                 "config file's or the variable's model (the default one of several; its adapter is "
                 f"not part of the base). [default: {DEFAULT_MODEL}; env: {env_name('model')}]"),
    click.option("--revision",
                 help="Hub revision to pin the base model to. As for serve: without it, the config "
                 f"file's or the variable's. [default: unset; env: {env_name('revision')}]"),
    click.option("--cache-dir", type=click.Path(path_type=Path),
                 help="Where converted models and test models are kept, as for serve. "
                 f"[default: {DEFAULT_CACHE_DIR}; env: {env_name('cache_dir')}]"),
    click.option("--device",
                 help=f"auto, cpu, cuda or cuda:N, as for serve. [default: auto; env: {env_name('device')}]"),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                 show_default=True, help="auto: bf16 on GPUs that support it, else fp16 with a grad "
                 "scaler; fp32 on the CPU. (serve's dtype setting is not read: it is the dtype of "
                 "generation, not of training.)"),
    click.option("--task", default=DEFAULT_TASK, show_default=True,
                 help="The prompt the adapter learns to answer: one of the model's tasks "
                 "(more_detailed_caption is the same)."),
    click.option("--caption-ext", default="txt", show_default=True, help="Extension of the caption files."),
    click.option("--image-column",
                 help="Parquet dataset: the column of images (Image structs, bytes or paths), as for "
                      "vision-server caption. [default: found by name and type]"),
    click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
                 help="Passes over the training images."),
    click.option("--max-steps", type=click.IntRange(min=1),
                 help="Train N optimizer steps in all (overrides --epochs)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Images per forward pass."),
    click.option("--gradient-accumulation", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Micro-batches per optimizer step."),
    click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-4,
                 show_default=True, help="The LoRA weights' learning rate (after the warm-up)."),
    click.option("--lr-scheduler", type=click.Choice(["constant", "cosine", "linear"]), default="constant",
                 show_default=True, help="How the learning rate decays after the warm-up."),
    click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Optimizer steps of linear warm-up from 0."),
    click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw", show_default=True,
                 help="adamw8bit needs bitsandbytes."),
    click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="AdamW weight decay."),
    click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True, help="LoRA rank."),
    click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
                 help="LoRA alpha (the update is scaled by alpha/rank)."),
    click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05,
                 show_default=True, help="Dropout on the LoRA's input while training."),
    click.option("--target-modules", type=_targets, metavar="NAMES", default=",".join(LANGUAGE_TARGETS),
                 show_default=True,
                 help="Comma-separated linear layers of the language model to adapt."),
    click.option("--train-vision", is_flag=True, help="Also adapt the vision tower's linear layers."),
    click.option("--gradient-checkpointing", is_flag=True,
                 help="Recompute activations: less memory, slower."),
    click.option("--max-caption-tokens", type=click.IntRange(min=2), default=256, show_default=True,
                 help="Longer captions are cut to this many tokens."),
    click.option("--seed", type=int, default=42, show_default=True,
                 help="Data order, augmentation, LoRA initialisation, validation split."),
    click.option("--shuffle-tags", is_flag=True, help="Shuffle the comma-separated parts of each caption."),
    click.option("--keep-tokens", type=click.IntRange(min=0), default=0, show_default=True,
                 help="With --shuffle-tags/--caption-dropout: the first N parts stay in front "
                 "(a trigger word)."),
    click.option("--caption-dropout", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="Probability of dropping one part of a caption."),
    click.option("--val-split", type=_val_split, metavar="FRACTION|COUNT", default="0", show_default=True,
                 help="Images held out for validation: a fraction below 1 or a count."),
    click.option("--val-samples", type=click.IntRange(min=0), default=3, show_default=True,
                 help="Validation captions printed beside their targets after each epoch."),
    click.option("--save-every", type=click.IntRange(min=1), help="Also checkpoint every N steps."),
    click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Newest checkpoints kept."),
    click.option("--resume", type=click.Path(path_type=Path, exists=True),
                 help="A checkpoint folder, or an output folder (its newest checkpoint), to continue from."),
    click.option("--log-with", type=click.Choice(["auto", "tensorboard", "wandb", "none"]), default="auto",
                 show_default=True, help="auto: TensorBoard when installed, else none."),
    click.option("--overwrite", is_flag=True, help="Replace an earlier run's output folder."),
]  # fmt: skip


def train_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(PARAMS):
        func = option(func)
    return func


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Ctrl+C or SIGTERM ask the loop to stop at the next step; a second signal of either kind
    aborts at once (:class:`KeyboardInterrupt`; the signals received are in the list)."""
    received: list[int] = []

    def handle(signum: int, _frame: Any) -> None:
        first = not received
        received.append(signum)
        if not first:
            raise KeyboardInterrupt
        again = "Ctrl+C again" if signum == signal.SIGINT else f"a second {signal.Signals(signum).name}"
        print(
            f"\nstopping after this step to write a checkpoint ({again} aborts without one)",
            file=sys.stderr,
        )

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_command(params: dict[str, Any], config: Path | None = None) -> int:
    """Train as ``params`` (the command's options) say, taking the settings shared with serve
    from the flags among them, the environment and the config file (``config``)."""
    from vision_server.disk_full import DiskFull
    from vision_server.settings import SettingsError
    from vision_server.train.dataset import DatasetError, OptionError
    from vision_server.train.loop import run_training
    from vision_server.train.model import ModelError
    from vision_server.train.preflight import TrainError
    from vision_server.train.reporting import LoggerUnavailable, counted
    from vision_server.train.shared_settings import SHARED, shared_settings

    flags = {name: params.pop(name) for name in SHARED}
    try:
        shared = shared_settings(flags, environ=os.environ, config_path=config)
    except (SettingsError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    options = TrainOptions(**params, **shared.options())
    with stop_on_signals() as received:
        try:
            result = run_training(options, should_stop=lambda: bool(received))
        except (TrainError, LoggerUnavailable, OptionError) as exc:
            raise click.UsageError(str(exc)) from None
        except ModelError as exc:
            elsewhere = shared.set_elsewhere()
            click.echo(f"Error: {exc}" + (f" ({elsewhere})" if elsewhere else ""), err=True)
            return 1
        except (DatasetError, DiskFull) as exc:
            click.echo(f"Error: {exc}", err=True)
            return 1
        except KeyboardInterrupt:  # a second Ctrl+C or SIGTERM
            click.echo("aborted without a checkpoint", err=True)
            return 128 + (received[-1] if received else signal.SIGINT)
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if not result.finished:
        return 128 + (received[0] if received else signal.SIGINT)
    losses = result.metadata
    summary = f"trained {counted(result.steps, 'step')}; final train loss {losses['final_train_loss']:.4f}"
    if losses.get("final_val_loss") is not None:
        summary += f", validation loss {losses['final_val_loss']:.4f}"
    click.echo(summary, err=True)
    click.echo(str(result.output))
    return 0
