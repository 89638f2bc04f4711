"""What a training run checks before the model loads, so a mistake the user can fix is
reported in seconds: the task, the output folder (may it be written; which checkpoint to resume from),
that a resume continues the same run, and that the chosen optimizer is installed; and the
clearing of an earlier run's folder that ``--overwrite`` allows."""

from __future__ import annotations

import shutil
from pathlib import Path

from vision_server.disk_full import DiskFull, is_disk_full
from vision_server.errors import InvalidTask
from vision_server.florence.prompts import tasks_for_model
from vision_server.tasks import normalize_task
from vision_server.train.checkpoint import CHECKPOINTS, ResumeState, find_checkpoint
from vision_server.train.dataset import Example
from vision_server.train.metadata import METADATA_FILE
from vision_server.train.options import TrainOptions, plan_differences


class TrainError(RuntimeError):
    """A usage problem found before training (output folder, resume mismatch, missing package)."""


def check_resumable(
    checkpoint: Path | None, saved: ResumeState, options: TrainOptions, train_set: list[Example]
) -> None:
    """A resume continues the same run: same plan options, same training images."""
    differences = plan_differences(saved.options, options)
    names = [example.name for example in train_set]
    if saved.train_images and saved.train_images != names:
        added = len(set(names) - set(saved.train_images))
        removed = len(set(saved.train_images) - set(names))
        differences.append(f"the training images: {added} added, {removed} removed or renamed since")
    if differences:
        raise TrainError(
            f"--resume {checkpoint}: this run differs from the interrupted one "
            "(use the same options and dataset to continue it exactly):\n  " + "\n  ".join(differences)
        )


def canonical_task(task: str, model: str) -> str:
    """The token the server asks the model for (``more_detailed_caption`` is
    ``<MORE_DETAILED_CAPTION>``): an adapter trained on any other prompt would never be asked."""
    valid = tasks_for_model(model)
    try:
        return normalize_task(task, valid)
    except InvalidTask:
        raise TrainError(f"--task {task!r} is no task of this model; use one of {', '.join(valid)}") from None


def check_output(options: TrainOptions) -> Path | None:
    """The checkpoint to resume from (if any), after checking the output folder may be written."""
    checkpoint = _checkpoint_to_resume(options)
    check_writable(options.output)
    return checkpoint


def check_writable(output: Path) -> None:
    """Create the folder and a file in it, then remove what this check created: a folder that
    cannot be written is found now, not after the model has loaded. A full disk is a
    :class:`~vision_server.disk_full.DiskFull` naming ``output``; anything else a usage error."""
    made = []
    existing = output
    while not existing.exists() and existing != existing.parent:
        made.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"--output {output}: {existing} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if is_disk_full(exc):  # no mistake of the command: exit 1, said as every full disk is
            raise DiskFull(output, exc) from None
        raise TrainError(f"--output {output}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _checkpoint_to_resume(options: TrainOptions) -> Path | None:
    output = options.output
    checkpoint = None
    if options.resume is not None:
        try:
            checkpoint = find_checkpoint(options.resume)
        except FileNotFoundError as exc:
            hint = ""
            if options.resume.is_dir() and _only_tracker_logs(options.resume):
                hint = " (that run stopped before its first checkpoint: start again with --overwrite)"
            elif (options.resume / "adapter_config.json").is_file():
                hint = " (it holds a finished adapter: there is nothing to resume)"
            raise TrainError(f"{exc}{hint}") from None
    occupied = output.exists() and (not output.is_dir() or any(output.iterdir()))
    if not occupied:
        return checkpoint
    if not output.is_dir():
        raise TrainError(f"--output {output} is a file; pick a folder")
    inside = checkpoint is not None and checkpoint.resolve().is_relative_to(output.resolve())
    if inside and options.overwrite:
        raise TrainError(f"--overwrite would delete {checkpoint}, the checkpoint to resume from")
    if inside:
        return checkpoint
    if not options.overwrite:
        raise TrainError(
            f"--output {output} already exists and is not empty; pass --overwrite to replace it, "
            "or pick a new folder"
        )
    if not _looks_like_training_output(output):
        raise TrainError(
            f"--output {output} holds files that are not a training run's; --overwrite only "
            "replaces an earlier run's folder. Pick a new folder."
        )
    return checkpoint


def _looks_like_training_output(output: Path) -> bool:
    """An earlier run's folder: its adapter or checkpoints, or only the tracker's logs of a run
    that stopped (a second Ctrl+C, a crash) before its first checkpoint."""
    if any((output / name).exists() for name in (METADATA_FILE, CHECKPOINTS, "adapter_config.json")):
        return True
    return _only_tracker_logs(output)


def _only_tracker_logs(output: Path) -> bool:
    """Nothing in ``output`` but TensorBoard events in ``logs/`` and wandb's ``wandb/`` folder."""
    entries = list(output.iterdir())
    for entry in entries:
        if entry.name == "wandb" and entry.is_dir():
            continue
        if entry.name != "logs" or not entry.is_dir():
            return False
        if not all(log.name.startswith("events.out.tfevents.") for log in entry.iterdir()):
            return False
    return bool(entries)


def clear_output(output: Path) -> None:
    for path in output.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_optimizer(name: str) -> None:
    if name == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); use adamw")
