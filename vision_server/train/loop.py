"""The training run: check everything, load, then optimise the LoRA step by step.

Order of work: the dataset, the output folder, the tracker and the optimizer choice are checked
before the model loads, so every mistake the user can fix is reported in seconds. The data order
of each epoch and each caption's augmentation are derived from the seed, and the torch generator
state is saved with every checkpoint, so a resumed run repeats the uninterrupted run's numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vision_server import __version__
from vision_server.disk_full import DiskFull, raise_as_disk_full
from vision_server.florence.inputs import pixel_values, prompt_ids
from vision_server.images import prepare_image
from vision_server.output_lock import OutputBusy, OutputLockError, holding
from vision_server.train.augment import Augmentation, caption_rng
from vision_server.train.checkpoint import (
    ResumeState,
    list_checkpoints,
    load_adapter_weights,
    read_state,
    save_checkpoint,
    write_final,
)
from vision_server.train.dataset import MAX_PIXELS, Example, ImageChanged, load_dataset, read_failure, split
from vision_server.train.model import BaseModel, Precision, add_lora, load_base, pick_precision
from vision_server.train.options import TrainOptions
from vision_server.train.preflight import (
    TrainError,
    canonical_task,
    check_optimizer,
    check_output,
    check_resumable,
    check_writable,
    clear_output,
)
from vision_server.train.reporting import Progress, Tracker, counted, pick_tracker
from vision_server.train.start_undo import StartUndo

PIXEL_CACHE_BYTES = 1 << 30  # decoded, resized images kept in memory (a few hundred at 768 px)


@dataclass
class TrainResult:
    output: Path
    steps: int
    total_steps: int
    history: list[dict[str, Any]]
    checkpoint: Path | None = None  # where an interrupted run can resume from
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what went wrong after the work was kept

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


@dataclass
class _Plan:
    steps_per_epoch: int
    total_steps: int


def plan_steps(options: TrainOptions, train_size: int) -> _Plan:
    micro_batches = math.ceil(train_size / options.batch_size)
    per_epoch = math.ceil(micro_batches / options.gradient_accumulation)
    total = options.max_steps if options.max_steps is not None else options.epochs * per_epoch
    return _Plan(per_epoch, total)


def run_training(
    options: TrainOptions, *, should_stop: Callable[[], bool] = lambda: False, stream: IO[str] | None = None
) -> TrainResult:
    """Train as ``options`` say; stop early (with a checkpoint) once ``should_stop()`` is true.

    The output folder is locked for the whole run (:mod:`vision_server.output_lock`): a second
    run into it, even with ``--overwrite`` or ``--resume``, stops before it looks at the folder,
    and in any case before its model loads. A full disk met anywhere is a
    :class:`~vision_server.disk_full.DiskFull` saying what was kept and how to go on."""
    options = dataclasses.replace(options, task=canonical_task(options.task, options.model))
    examples = load_dataset(
        options.dataset, caption_ext=options.caption_ext, task=options.task, image_column=options.image_column
    )
    train_set, val_set = split(examples, options.val_split, options.seed)
    made = StartUndo()
    try:
        check_writable(options.output)  # before the lock: a folder no run can write is said as such
        with ExitStack() as held:
            # The lock file goes beside the output. Where that folder is missing no run writes
            # the output yet: the quick checks run first (leaving nothing behind when they
            # fail), then the folders are made and locked, before the slow model load. A start
            # that fails takes away what it made: its lock file while it holds the lock, the
            # folders once it has let go.
            locked = options.output.parent.is_dir() and _lock(held, options.output, made)
            return _checked_run(
                options, train_set, val_set, should_stop, stream, None if locked else held, made
            )
    except DiskFull as exc:
        exc.note = exc.note or _go_on(options.output, "free some space")
        raise
    finally:
        made.remove_folders()


def _lock(held: ExitStack, output: Path, made: StartUndo) -> bool:
    """Hold ``output``'s lock until ``held`` closes (its lock file noted in ``made`` when this
    run makes it); a usage error when another run holds it (said for a training run: the lock's
    own words speak of captions)."""
    try:
        held.enter_context(holding([output], made.lock_files))
    except OutputBusy as exc:
        raise TrainError(
            f"--output {output} is being written by another run (it holds the lock {exc.lock.name} "
            "beside it, on this machine or another one sharing the folder): let that run finish, "
            "or pick another folder"
        ) from None
    except OutputLockError as exc:
        raise TrainError(str(exc)) from None
    return True


def _checked_run(
    options: TrainOptions,
    train_set: list[Example],
    val_set: list[Example],
    should_stop: Callable[[], bool],
    stream: IO[str] | None,
    lock_later: ExitStack | None,
    made: StartUndo,
) -> TrainResult:
    try:
        trainer, tracker_kind = _start(options, train_set, val_set, stream, lock_later, made)
    except BaseException:  # nothing trained or written: the disk as it was (see run_training)
        made.undo()
        raise
    if not options.resume and options.overwrite:  # an earlier run's folder (check_output)
        clear_output(options.output)
    tracker = Tracker(tracker_kind, options.output, options.as_dict())
    try:
        result = trainer.run(tracker, should_stop)
    except BaseException:
        with suppress(Exception):  # its own disk-full error says no more than the first one
            tracker.close()
        raise
    try:
        tracker.close()
    except DiskFull as exc:  # the adapter (or the checkpoint of a stopped run) is whole already
        result.warnings.append(_logs_unfinished(exc, result, tracker.name))
    return result


def _start(
    options: TrainOptions,
    train_set: list[Example],
    val_set: list[Example],
    stream: IO[str] | None,
    lock_later: ExitStack | None,
    made: StartUndo,
) -> tuple[_Trainer, str]:
    """Everything before the run's first write: the quick checks, the lock (unless taken
    already), the model, the resumed state, and the output folder. Returns the trainer and the
    tracker's kind."""
    checkpoint = check_output(options)
    saved = read_state(checkpoint) if checkpoint else None
    if saved is not None:
        check_resumable(checkpoint, saved, options, train_set)
    tracker_kind = pick_tracker(options.log_with)
    check_optimizer(options.optimizer)
    precision = pick_precision(options.device, options.precision)
    if lock_later is not None:
        _make_folders(made, options.output.parent)
        _lock(lock_later, options.output, made)
        check_output(options)  # a run started with this one may have made the folder meanwhile
    base = load_base(options, precision)
    trainer = _Trainer(options, base, precision, train_set, val_set, stream)
    if checkpoint is not None and saved is not None:
        trainer.resume(checkpoint, saved)
    _make_folders(made, options.output)
    return trainer, tracker_kind


def _make_folders(made: StartUndo, folder: Path) -> None:
    """``folder`` and the folders above it that are missing; a full disk said as such."""
    try:
        made.make_folders(folder)
    except OSError as exc:
        raise_as_disk_full(folder, exc)


def _logs_unfinished(exc: DiskFull, result: TrainResult, logs: str) -> str:
    """The warning for logs that could not be finished after the run's work was written."""
    kept = f"the checkpoint {result.checkpoint}" if result.checkpoint else f"the adapter in {result.output}"
    again = "" if result.checkpoint else " (nothing to resume)"
    return f"{exc}; {kept} is complete: only the {logs} logs lack their last values{again}"


def _go_on(output: Path, fix: str) -> str:
    """What a run that stopped on a fault kept, and how to go on from it once ``fix`` is done."""
    done = list_checkpoints(output)
    if done:
        return (
            f"the last complete checkpoint is {done[-1]}: {fix}, then continue with "
            f"--resume {output} (and the same options)"
        )
    # A folder with the logs of the run that stopped must be replaced; an empty one is reused.
    overwrite = " with --overwrite" if output.is_dir() and any(output.iterdir()) else ""
    return f"no checkpoint was written: {fix}, then run the same command again{overwrite}"


class _Trainer:
    def __init__(
        self,
        options: TrainOptions,
        base: BaseModel,
        precision: Precision,
        train_set: list[Example],
        val_set: list[Example],
        stream: IO[str] | None,
    ) -> None:
        from transformers import get_scheduler

        self.options = options
        self.base = base
        self.precision = precision
        self.train_set = train_set
        self.val_set = val_set
        self.stream = stream
        self.augmentation = Augmentation(options.shuffle_tags, options.keep_tokens, options.caption_dropout)
        self.plan = plan_steps(options, len(train_set))
        self.model = add_lora(base, options)
        self.model.config.use_cache = False
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(options, trainable)
        names = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
        self.scheduler = get_scheduler(
            names[options.lr_scheduler],
            self.optimizer,
            num_warmup_steps=options.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        self.scaler = torch.amp.GradScaler("cuda") if precision.scaler else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.epoch_sum = 0.0
        self.epoch_count = 0
        self._pixels: dict[str, np.ndarray] = {}
        self._pixel_bytes = 0
        tokenizer = base.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.prompt = prompt_ids(base.processor, [options.task] * options.batch_size)

    # --- resume and save ---------------------------------------------------------------------------

    def resume(self, checkpoint: Path, state: ResumeState) -> None:
        load_adapter_weights(checkpoint, self.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.cpu_rng)
        if state.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.cuda_rng)
        self.step = state.step
        self.history = state.history
        self.epoch_sum, self.epoch_count = state.epoch_sum, state.epoch_count
        self._say(f"resuming from {checkpoint} at step {self.step}/{self.plan.total_steps}")

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
            "epoch_sum": self.epoch_sum,
            "epoch_count": self.epoch_count,
            "options": self.options.as_dict(),
            "train_images": [example.name for example in self.train_set],
        }

    def _save(self) -> Path:
        return save_checkpoint(
            self.options.output,
            self.step,
            self.model,
            self.metadata(),
            self._state(),
            self.options.keep_checkpoints,
        )

    def metadata(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        options = self.options.as_dict()
        for name in ("resume", "overwrite"):
            options.pop(name)
        return {
            "base_model": self.options.model,
            "revision": self.options.revision or self.base.resolved_revision,
            "task": self.options.task,
            "steps": self.step,
            "epochs": round(self.step / self.plan.steps_per_epoch, 3),
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "history": self.history,
            "train_images": len(self.train_set),
            "validation_images": [example.name for example in self.val_set],
            "precision": self.precision.name,
            "options": options,
            "vision_server_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    # --- the loop -----------------------------------------------------------------------------------

    def run(self, tracker: Tracker, should_stop: Callable[[], bool]) -> TrainResult:
        plan = self.plan
        progress = Progress(plan.total_steps, initial=self.step, stream=self.stream)
        batch = f"{self.options.batch_size}x{self.options.gradient_accumulation}"
        self._say(
            f"training {counted(len(self.train_set), 'image')} ({len(self.val_set)} for validation), "
            f"{counted(plan.total_steps, 'step')} of {batch} "
            f"on {self.precision.device} in {self.precision.name}",
            progress,
        )
        checkpoint = None
        self.model.train()
        try:
            self._end_pending_epoch(tracker, progress)
            while self.step < plan.total_steps:
                epoch, in_epoch = divmod(self.step, plan.steps_per_epoch)
                groups = self._epoch_groups(epoch)
                for group in groups[in_epoch:]:
                    loss = self._optimizer_step(group, epoch)
                    saving = self._count_step(loss, epoch, tracker, progress)
                    if saving and self.step < plan.total_steps:
                        checkpoint = self._save()
                    if self.step < plan.total_steps and should_stop():
                        checkpoint = checkpoint if saving else self._save()
                        progress.write(f"stopped at step {self.step}; continue with --resume {checkpoint}")
                        return TrainResult(
                            self.options.output, self.step, plan.total_steps, self.history, checkpoint
                        )
                    if self.step >= plan.total_steps:
                        break
        except ImageChanged as exc:  # a training image, or a validation image at an epoch's end
            exc.note = self._kept_after()
            raise
        finally:
            progress.close()
        metadata = self.metadata()
        write_final(self.options.output, self.model, metadata)
        return TrainResult(self.options.output, self.step, plan.total_steps, self.history, None, metadata)

    def _kept_after(self) -> str:
        """Checkpoint the steps done before an image could not be read (unless the newest
        checkpoint holds them already), and say how to go on. A validation image met at an
        epoch's end leaves that epoch's validation to do: :meth:`_end_pending_epoch` does it
        first when the run is resumed."""
        if self.step > 0:
            done = list_checkpoints(self.options.output)
            if not done or done[-1].name != f"step-{self.step:08d}":
                self._save()
        return _go_on(self.options.output, "put the image back as it was")

    def _count_step(self, loss: float, epoch: int, tracker: Tracker, progress: Progress) -> bool:
        """Book one optimizer step (progress, tracker, the epoch's end); True when a checkpoint
        is due after it (an epoch's end, or every ``--save-every`` steps)."""
        plan = self.plan
        self.step += 1
        self.epoch_sum += loss
        self.epoch_count += 1
        lr = self.scheduler.get_last_lr()[0]
        progress.update(self.step, loss, lr)
        tracker.log(self.step, {"train/loss": loss, "train/lr": lr})
        epoch_done = self.step % plan.steps_per_epoch == 0 or self.step == plan.total_steps
        if epoch_done:
            self._end_epoch(epoch, tracker, progress)
        return epoch_done or bool(self.options.save_every and self.step % self.options.save_every == 0)

    def _epoch_groups(self, epoch: int) -> list[list[tuple[int, Example]]]:
        """This epoch's micro-batches, grouped per optimizer step; (position, example) pairs."""
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        size = self.options.batch_size
        micro = [
            [(pos, self.train_set[i]) for pos, i in enumerate(order[start : start + size], start)]
            for start in range(0, len(order), size)
        ]
        accumulation = self.options.gradient_accumulation
        return [
            [pair for batch in micro[i : i + accumulation] for pair in batch]
            for i in range(0, len(micro), accumulation)
        ]

    def _optimizer_step(self, group: list[tuple[int, Example]], epoch: int) -> float:
        size = self.options.batch_size
        batches = [group[i : i + size] for i in range(0, len(group), size)]
        total = 0.0
        generators = _generators()
        try:
            for batch in batches:
                texts = [
                    self.augmentation.apply(ex.text, caption_rng(self.options.seed, epoch, pos))
                    for pos, ex in batch
                ]
                loss = self._loss([ex for _, ex in batch], texts) / len(batches)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
                total += float(loss.detach())
        except ImageChanged:
            # As if the step never began: a checkpoint now resumes exactly where it would have.
            self.optimizer.zero_grad(set_to_none=True)
            _restore_generators(generators)
            raise
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _loss(self, examples: list[Example], texts: list[str]) -> torch.Tensor:
        inputs = self._inputs(examples)
        labels = self._labels(texts)
        device = self.precision.device
        with torch.autocast(device.type, dtype=self.precision.dtype, enabled=self.precision.autocast):
            out = self.model(**inputs, labels=labels.to(device))
        loss: torch.Tensor = out.loss.float()
        return loss

    def _inputs(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        device = self.precision.device
        count = len(examples)
        inputs = {name: tensor[:count].to(device) for name, tensor in self.prompt.items()}
        batch = np.stack([self._pixels_of(ex) for ex in examples])
        values = pixel_values(batch, self.base.pixels, device)
        inputs["pixel_values"] = values.to(self.precision.dtype)
        return inputs

    def _labels(self, texts: list[str]) -> torch.Tensor:
        tokenizer = self.base.processor.tokenizer
        ids = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.options.max_caption_tokens,
            return_tensors="pt",
        ).input_ids
        return ids.masked_fill(ids == self.pad_id, -100)

    def _pixels_of(self, example: Example) -> np.ndarray:
        cached = self._pixels.get(example.name)
        if cached is not None:
            return cached
        try:
            pixels = prepare_image(example.read(), self.base.pixels, max_pixels=MAX_PIXELS).pixels
        except Exception as exc:
            reason = read_failure(exc)
            if reason is None:
                raise
            raise ImageChanged(self.options.dataset, example.name, reason) from None
        if self._pixel_bytes + pixels.nbytes <= PIXEL_CACHE_BYTES:
            self._pixels[example.name] = pixels
            self._pixel_bytes += pixels.nbytes
        return pixels

    # --- validation ---------------------------------------------------------------------------------

    def _end_pending_epoch(self, tracker: Tracker, progress: Progress) -> None:
        """End the epoch whose validation a changed image stopped, when resumed from the
        checkpoint written then: it is at the epoch's last step, with the epoch's losses still
        counted (an epoch that ended resets them), so the resumed run validates as the
        uninterrupted one did before going on."""
        plan = self.plan
        at_end = self.step % plan.steps_per_epoch == 0 or self.step == plan.total_steps
        if self.step > 0 and at_end and self.epoch_count > 0:
            self._end_epoch((self.step - 1) // plan.steps_per_epoch, tracker, progress)

    def _end_epoch(self, epoch: int, tracker: Tracker, progress: Progress) -> None:
        """The epoch's losses into the history, after its validation: a validation image that
        changed leaves them as they were (and the generators), for the checkpoint written then."""
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": self.epoch_sum / max(1, self.epoch_count),
            "val_loss": None,
        }
        line = f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}"
        samples: list[tuple[str, str, str]] = []
        if self.val_set:
            generators = _generators()
            try:
                entry["val_loss"], samples = self._validate()
            except ImageChanged:
                _restore_generators(generators)  # as if the validation never began
                raise
            line += f", validation loss {entry['val_loss']:.4f}"
            tracker.log(self.step, {"val/loss": entry["val_loss"]})
        self.epoch_sum, self.epoch_count = 0.0, 0
        tracker.log(self.step, {"train/epoch_loss": entry["train_loss"]})
        self.history.append(entry)
        progress.write(line)
        for name, target, output in samples:
            progress.write(f"  {name}\n    target: {_indented(target)}\n    output: {_indented(output)}")

    @torch.no_grad()
    def _validate(self) -> tuple[float, list[tuple[str, str, str]]]:
        self.model.eval()
        try:
            size = self.options.batch_size
            total, count = 0.0, 0
            for start in range(0, len(self.val_set), size):
                batch = self.val_set[start : start + size]
                total += float(self._loss(batch, [ex.text for ex in batch])) * len(batch)
                count += len(batch)
            shown = self.val_set[: self.options.val_samples]
            outputs = self.generate(shown) if shown else []
            return total / count, [(ex.name, ex.text, out) for ex, out in zip(shown, outputs, strict=True)]
        finally:
            self.model.train()

    def generate(self, examples: list[Example]) -> list[str]:
        """Greedy captions from the model as it is now (validation samples), ``--batch-size`` at
        a time: the prompt is built for that many rows, and more would not fit in memory anyway."""
        size = self.options.batch_size
        device = self.precision.device
        texts: list[str] = []
        for start in range(0, len(examples), size):
            inputs = self._inputs(examples[start : start + size])
            with torch.autocast(device.type, dtype=self.precision.dtype, enabled=self.precision.autocast):
                sequences = self.model.generate(
                    **inputs, max_new_tokens=self.options.max_caption_tokens, num_beams=1, do_sample=False
                )
            texts += self.base.processor.batch_decode(sequences, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _say(self, text: str, progress: Progress | None = None) -> None:
        if progress is not None:
            progress.write(text)
        else:
            print(text, file=self.stream or sys.stderr, flush=True)


def _generators() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _restore_generators(saved: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state_all(saved[1])


def _indented(text: str) -> str:
    """A caption's later lines under its first, so a multi-line caption stays inside its sample."""
    return text.replace("\n", "\n" + " " * len("    target: "))


def _make_optimizer(options: TrainOptions, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if options.optimizer == "adamw8bit":
        import importlib

        bnb = importlib.import_module("bitsandbytes.optim")  # optional: present only where installed
        optimizer: torch.optim.Optimizer = bnb.AdamW8bit(
            parameters, lr=options.learning_rate, weight_decay=options.weight_decay
        )
        return optimizer
    return torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
