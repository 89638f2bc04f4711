"""``vision-server caption``: check the request, build the outputs and the engine, run, report.

Exit status: 0 when every image was captioned or skipped, 1 when any failed (or the model could
not load: the summary, then the load error and how to go on), 2 for bad usage (raised as
:class:`click.UsageError` before any work), and 128 + the signal number when Ctrl+C or SIGTERM
stopped the run (cleanly; the same command resumes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from vision_server.bulk.outputs import (
    Captions,
    JsonlOutput,
    Output,
    ParquetOutput,
    RowFacts,
    Sidecars,
    SidecarStyle,
    check_writable,
    close_all,
    output_problem,
)
from vision_server.bulk.pipeline import BulkPipeline, EngineFactory, PipelineConfig
from vision_server.bulk.plan import Fail, Skip, Unit, Work, plan
from vision_server.bulk.progress import Progress, format_load_failure, format_summary
from vision_server.bulk.readers import (
    InputError,
    ReadOptions,
    check_inputs,
    count_images,
    distinct_inputs,
    image_column_note,
    iter_records,
)
from vision_server.bulk.records import Record
from vision_server.captionfiles import CaseProbe, Mode, caption_suffix, folds_case
from vision_server.engine.scheduler import Engine
from vision_server.errors import InvalidTask, ModelLoadError
from vision_server.model_specs import adapter_identity, model_identity
from vision_server.output_lock import LockNoRoom, OutputLockError, holding
from vision_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"
OFFLINE_SETTINGS = (
    "model",
    "default_model",
    "backend",
    "revision",
    "adapter",
    "device",
    "dtype",
    "cache_dir",
    "max_queue",
    "max_batch_size",
    "max_batch_wait_ms",
    "max_image_pixels",
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "compile",
    "log_level",
    "log_format",
    "log_file",
)
# The settings whose server help speaks of requests, lanes and status codes, in offline words.
OFFLINE_HELP = {
    "model": "The model to caption with: a hub id or local directory of a Florence-2 model, or of "
    "another transformers image-to-text model (BLIP, GIT, ViT+GPT-2, Idefics3/SmolVLM; see "
    "--backend); 'test:tiny' is a self-built tiny Florence-2 whose captions are meaningless. "
    "SOURCE+ADAPTER_DIR puts a LoRA adapter on top. Of several (NAME=SOURCE, e.g. in a config file "
    "shared with the server) the default one captions; see --default-model.",
    "default_model": "Of several models, the NAME of the one that captions. Unset: the first --model.",
    "max_queue": "Most images waiting for the model at once; the readers wait for room (nothing is "
    "refused), and below --max-batch-size it makes batches smaller.",
    "max_image_pixels": "Largest image captioned, in pixels; a larger one fails with a message "
    "(stops decompression bombs).",
    "max_new_tokens": "Most tokens generated per caption. A model whose text decoder holds fewer "
    "(BLIP: 512) is clamped to its own limit.",
}
COUNT_WAIT_S = 5.0  # after a failed load, how long to wait for the count of images left
BATCHES_IN_FLIGHT = 3  # one running, one queued, one being decoded: the model never waits


@dataclass(frozen=True)
class CaptionRequest:
    """The command's own options (everything but :class:`Settings`)."""

    inputs: tuple[Path, ...]
    tasks: tuple[str, ...] = ()
    recursive: bool = True
    jsonl: Path | None = None
    parquet: Path | None = None
    sidecars: bool | None = None
    ext: str = "txt"
    mode: Mode = "skip"
    prefix: str = ""
    suffix: str = ""
    separator: str = " "
    image_column: str | None = None
    key_column: str | None = None
    limit: int | None = None
    dry_run: bool = False
    workers: int | None = None
    progress_interval: float = 10.0
    ray: str | None = None  # "local" (an embedded runtime), "auto" or a cluster address
    ray_actors: int | None = None
    # Whether a folder's file system folds case, so b.jpg and B.png share a caption file there:
    # the file system is asked (captionfiles.folds_case); tests stand in for a macOS or Windows disk.
    case_probe: CaseProbe = folds_case


def run_caption(settings: Settings, request: CaptionRequest) -> int:
    """Run the command; returns the exit status (usage errors raise click.UsageError)."""
    try:
        return _run_caption(settings, request)
    except KeyboardInterrupt:
        # Ctrl+C before the stop handlers are in place (imports, model setup, a dry run's
        # listing): exit as a stop, not as click's "Aborted!" with 1 ("some image failed").
        click.echo("interrupted by SIGINT before captioning began; run the same command again", err=True)
        return 128 + signal.SIGINT


def _run_caption(settings: Settings, request: CaptionRequest) -> int:
    """Every check that can refuse the request (bad usage, exit 2) comes before any work: the
    inputs, the logging, the tasks, where the captions go, the outputs' locks."""
    read = ReadOptions(
        request.recursive, request.image_column, request.key_column, case_probe=request.case_probe
    )
    kinds = _check_inputs(request, read)
    _set_up(settings, request)
    request = _without_repeats(request, kinds)
    _note_image_columns(kinds, read)
    tasks = _default_model_tasks(settings, request)
    sidecars = _wants_sidecars(request, kinds)
    if request.dry_run:  # reads only, unlocked: another run may be writing the outputs meanwhile
        outputs = _outputs(request, settings, tasks, sidecars)
        return _dry_run(plan(iter_records(request.inputs, read), tasks, outputs, request.limit))
    _check_outputs(request)
    shared = [path for path in (request.jsonl, request.parquet) if path is not None]
    try:
        # One run at a time per JSONL/Parquet output, for the whole run (also with --ray, whose
        # rows are written here), taken before the output is read back or the model loads.
        with holding(shared) as locked:
            _check_new_outputs(shared)
            return _caption_holding_outputs(settings, request, read, kinds, tasks, sidecars, locked)
    except LockNoRoom as exc:  # a full disk: no mistake of the command (exit 1, as every full disk)
        raise click.ClickException(str(exc)) from None
    except OutputLockError as exc:
        raise click.UsageError(str(exc)) from None


def _set_up(settings: Settings, request: CaptionRequest) -> None:
    """Ray Data when ``--ray`` asks for it, and the logging; a usage error when either cannot be."""
    from vision_server.logs import configure_logging

    if request.ray is not None:
        from vision_server.bulk.ray import require_ray

        require_ray()
    from vision_server.runtime import check_cache_dir

    try:
        configure_logging(settings.log_level, settings.log_format, settings.log_file)
        if not request.dry_run:  # a dry run makes nothing
            check_cache_dir(settings)
    except SettingsError as exc:  # a --log-file or --cache-dir that cannot be: a usage error, as for serve
        raise click.UsageError(str(settings.located(exc))) from None


def _note_image_columns(kinds: dict[Path, str], read: ReadOptions) -> None:
    """Warn about each Parquet input whose image column was guessed, or is worth a word."""
    for path in (path for path, kind in kinds.items() if kind.startswith("parquet")):
        note = image_column_note(path, read)
        if note:
            log.warning("%s", note)


def _default_model_tasks(settings: Settings, request: CaptionRequest) -> tuple[str, ...]:
    """The requested tasks, checked against what the default model (the one that captions)
    offers, known without torch: a dry run never imports it."""
    from vision_server.runtime import model_tasks

    spec = settings.default_model_spec
    if len(settings.model_specs) > 1:
        others = ", ".join(other.name for other in settings.model_specs if other is not spec)
        log.info(
            "captioning with the default model %s (not %s; pick with --default-model)",
            spec.describe(),
            others,
        )
    try:
        valid = model_tasks(settings, spec)
    except SettingsError as exc:
        raise click.UsageError(str(settings.located(exc))) from None
    return _tasks(request.tasks, valid)


def _wants_sidecars(request: CaptionRequest, kinds: dict[Path, str]) -> bool:
    """Whether caption files are written (by default, unless a table output is named); a usage
    error when the captions would go nowhere, or an input has no files to put them beside."""
    sidecars = request.sidecars if request.sidecars is not None else not (request.jsonl or request.parquet)
    if not sidecars and not (request.jsonl or request.parquet):
        raise click.UsageError("--no-sidecars needs --jsonl or --parquet: captions must go somewhere")
    needs_table = [str(p) for p, kind in kinds.items() if kind == "webdataset" or kind == "parquet-bytes"]
    if needs_table and not (request.jsonl or request.parquet):
        raise click.UsageError(
            f"{needs_table[0]} holds image bytes, not files a caption file could go beside; "
            "add --jsonl FILE or --parquet FILE"
        )
    return sidecars


def _caption_holding_outputs(
    settings: Settings,
    request: CaptionRequest,
    read: ReadOptions,
    kinds: dict[Path, str],
    tasks: tuple[str, ...],
    sidecars: bool,
    locked: frozenset[Path],
) -> int:
    """The run proper, once its shared outputs are this run's alone (``locked``: those whose lock
    it holds; one where no lock could be had is not): locally or on Ray."""
    outputs = _outputs(request, settings, tasks, sidecars, locked)
    # A run that writes caption files also sweeps the temp files a killed run left beside them.
    read = dataclasses.replace(read, tidy=sidecars)
    if request.ray is not None:
        from vision_server.bulk.ray import run_ray

        return run_ray(settings, request, read, kinds, tasks, outputs)
    return asyncio.run(_run(settings, request, read, tasks, outputs))


def _engine_factory(settings: Settings) -> EngineFactory:
    """What builds the default model's captioner (importing torch) and its engine, called by the
    pipeline when the first image to caption comes up: a rerun with nothing left builds neither."""

    def make_engine() -> Engine:
        from vision_server.runtime import build_captioner, engine_config

        try:
            captioner = build_captioner(settings, settings.default_model_spec)
        except SettingsError as exc:  # found while planning already, unless the model changed since:
            # the run stops as for a model that does not load, with its summary (see BulkPipeline)
            raise ModelLoadError(str(settings.located(exc))) from None
        config = dataclasses.replace(
            engine_config(settings, captioner),
            idle_timeout=-1,  # never unload mid-run
            memory_budget=None,  # one model, loaded once: a server's budget does not apply
            request_timeout=7 * 24 * 3600.0,  # flow control bounds the wait, not a deadline
            log_load_failures=False,  # said once, in the summary, with how to go on
        )
        return Engine(captioner, config)

    return make_engine


def _check_inputs(request: CaptionRequest, read: ReadOptions) -> dict[Path, str]:
    try:
        kinds: dict[Path, str] = dict(check_inputs(request.inputs, read))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    for path, kind in kinds.items():
        if kind == "parquet" and _parquet_holds_bytes(path, read):
            kinds[path] = "parquet-bytes"
    return kinds


def _without_repeats(request: CaptionRequest, kinds: dict[Path, str]) -> CaptionRequest:
    """Each image once, even when a folder is given twice or inside another given folder."""
    inputs, left_out = distinct_inputs(request.inputs, kinds, request.recursive)  # type: ignore[arg-type]
    for path, other in left_out:
        once = "it is captioned once" if kinds.get(path) == "file" else "its images are captioned once"
        if path == other:
            log.warning("%s is given twice: %s", path, once)
        elif os.path.realpath(path) == os.path.realpath(other):
            log.warning("%s is the same as %s (also given): %s", path, other, once)
        else:
            log.warning("%s is inside %s (also given): %s, as part of %s", path, other, once, other)
    return dataclasses.replace(request, inputs=inputs)


def _parquet_holds_bytes(path: Path, read: ReadOptions) -> bool:
    import pyarrow.parquet as pq

    from vision_server.bulk.readers import _image_column

    try:
        return _image_column(pq.read_schema(path), read.image_column)[1] != "path"
    except Exception:
        return True  # unreadable: reported per input while reading


def _tasks(requested: tuple[str, ...], valid: tuple[str, ...]) -> tuple[str, ...]:
    from vision_server.tasks import normalize_task

    try:
        default = DEFAULT_TASK if DEFAULT_TASK in valid else valid[0]  # BLIP & co. have one task
        tokens = [normalize_task(task, valid) for task in requested or (default,)]
    except InvalidTask as exc:
        raise click.UsageError(exc.message) from None
    return tuple(dict.fromkeys(tokens))  # the same task twice is one task


def _check_outputs(request: CaptionRequest) -> None:
    """What is wrong with the JSONL/Parquet outputs, found before their locks are taken, so
    without making or deleting anything (a lock would make a missing folder, and a lock file in
    a folder refused here)."""
    if request.jsonl and request.parquet and request.jsonl.resolve() == request.parquet.resolve():
        raise click.UsageError("--jsonl and --parquet name the same file")
    for path in (request.jsonl, request.parquet):
        problem = output_problem(path) if path is not None else None
        if problem:
            raise click.UsageError(f"cannot write the output: {problem}")
    inputs = {path.resolve() for path in request.inputs}
    for option, path in (("--jsonl", request.jsonl), ("--parquet", request.parquet)):
        if path is not None and path.resolve() in inputs:
            raise click.UsageError(f"{option} {path} is also an input: write the captions to another file")


def _check_new_outputs(shared: list[Path]) -> None:
    """That each output can be made, by making and deleting it: only under its lock, where no
    other run can have made it a moment before (and lose it to this check)."""
    for path in shared:
        problem = check_writable(path)
        if problem:
            raise click.UsageError(f"cannot write the output: {problem}")


def _outputs(
    request: CaptionRequest,
    settings: Settings,
    tasks: tuple[str, ...],
    sidecars: bool,
    locked: frozenset[Path] = frozenset(),
) -> list[Output]:
    spec = settings.default_model_spec
    # Rows name the model as vision-client folder's rows do: by its served name (NAME of
    # --model NAME=SOURCE; an unnamed model's is its source, see below). A rerun resumes from the rows
    # of this model only, as vision-client folder does; rows written before rows held the served
    # name hold the source, so it counts too.
    older = (spec.source,) if spec.source != spec.name else ()
    # An unnamed local model and the adapter as one absolute path each, however they were typed
    # and from wherever the run starts, so `--model ./m/` resumes the rows of `--model m`, and
    # `--adapter my-adapter/` those of `--adapter ./my-adapter`. (The rows stay on this machine:
    # the path that a server keeps from its clients, serving the folder under its name, is fine.)
    unnamed = not spec.named
    model = model_identity(spec.source) if unnamed else spec.name
    adapter = adapter_identity(spec.adapter) if spec.adapter is not None else None
    facts = RowFacts(tasks, model, adapter, older, local_model=unnamed and os.path.isabs(model))
    try:
        ext = caption_suffix(request.ext)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    read_back: list[tuple[Path, JsonlOutput | ParquetOutput]] = []
    try:
        if request.jsonl is not None:
            read_back.append((request.jsonl, JsonlOutput(request.jsonl, facts)))
        if request.parquet is not None:
            read_back.append(
                (
                    request.parquet,
                    ParquetOutput(
                        request.parquet, facts, sweep=not request.dry_run, locked=request.parquet in locked
                    ),
                )
            )
    except Exception as exc:  # an existing output we cannot read back cannot be resumed safely
        raise click.UsageError(f"cannot read the existing output to resume from it: {exc}") from None
    for path, table in read_back:  # nothing is written yet: JSONL and journal open on the first row
        problem = table.shapes.refusal(path, tasks)
        if problem is not None:
            raise click.UsageError(problem)
    tables: list[Output] = [table for _, table in read_back]
    if request.prefix or request.suffix:  # sidecars put them around the caption themselves
        tables = [_Wrapped(output, request.prefix, request.suffix) for output in tables]
    if not sidecars:
        return tables
    style = SidecarStyle(
        ext, request.mode, request.separator, len(tasks) > 1, prefix=request.prefix, suffix=request.suffix
    )
    return [Sidecars(style), *tables]


class _Wrapped:
    """An output whose new captions get ``prefix`` and ``suffix`` (a trigger word, say)."""

    def __init__(self, inner: Output, prefix: str, suffix: str) -> None:
        self.inner, self.prefix, self.suffix = inner, prefix, suffix

    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]:
        return self.inner.missing(record, tasks)

    def write(self, record: Record, captions: Captions, error: str | None) -> bool:
        wrapped = {task: f"{self.prefix}{text}{self.suffix}" for task, text in captions.items()}
        return self.inner.write(record, wrapped, error)

    def close(self) -> None:
        self.inner.close()


def _dry_run(units: Iterable[Unit]) -> int:
    """``caption``/``skip``/``fail`` TAB path TAB tasks-or-reason, one line per image, on stdout."""
    counts = {"caption": 0, "skip": 0, "fail": 0}
    for unit in units:
        if isinstance(unit, Work):
            word, detail = "caption", ",".join(unit.tasks)
        elif isinstance(unit, Skip):
            word, detail = "skip", unit.reason
        else:
            assert isinstance(unit, Fail)
            word, detail = "fail", unit.reason
        counts[word] += 1
        click.echo(f"{word}\t{unit.record.display}\t{detail}")
    click.echo(
        f"dry run: {counts['caption']} to caption, {counts['skip']} skipped, {counts['fail']} failing",
        err=True,
    )
    return 1 if counts["fail"] else 0


async def _run(
    settings: Settings,
    request: CaptionRequest,
    read: ReadOptions,
    tasks: tuple[str, ...],
    outputs: list[Output],
) -> int:
    from vision_server.signals import install_stop_handlers

    loop = asyncio.get_running_loop()
    stopper = _Stopper()
    undo = install_stop_handlers(loop, stopper.on_signal)
    progress: Progress | None = None
    closed = False
    try:
        # The engine is built and its model loaded when the first image to caption comes up
        # (the pipeline does both), so a rerun that finds everything captioned does neither.
        progress = Progress(interval=request.progress_interval)
        pipeline = BulkPipeline(
            _engine_factory(settings), outputs, _pipeline_config(settings, request, tasks), progress
        )
        stopper.attach(pipeline)
        counting = _count_in_background(loop, request, read, progress)
        summary = await pipeline.run(plan(iter_records(request.inputs, read), tasks, outputs, request.limit))
    finally:
        closed = await asyncio.to_thread(close_all, outputs)
        undo()
        if progress is not None:
            progress.close()
    click.echo(format_summary(summary), err=True)
    if pipeline.load_error is None:
        # An output that could not be closed (a fold that found the disk full) lacks rows.
        return summary.exit_status or (0 if closed else 1)
    # The number left, when the images are quickly counted (the count's total arrives through
    # the loop, so wait without blocking it).
    await asyncio.to_thread(counting.join, COUNT_WAIT_S)
    total = progress.total if request.limit is None else None
    click.echo(format_load_failure(summary, pipeline.load_error, total), err=True)
    return summary.exit_status if summary.interrupted is not None else 1


def _pipeline_config(settings: Settings, request: CaptionRequest, tasks: tuple[str, ...]) -> PipelineConfig:
    workers = request.workers or min(8, os.cpu_count() or 1)
    return PipelineConfig(
        tasks=tasks,
        options=settings.generation_defaults(),
        max_pixels=settings.max_image_pixels,
        workers=workers,
        batches_in_flight=BATCHES_IN_FLIGHT,
        min_in_flight=2 * workers,
    )


class _Stopper:
    """Ctrl+C or SIGTERM during a run: the first stops the pipeline cleanly (also one that
    arrives before the pipeline is there to be told), a second quits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.pipeline: BulkPipeline | None = None

    def attach(self, pipeline: BulkPipeline) -> None:
        self.pipeline = pipeline
        if self.signum is not None:  # a handler may run between any two lines
            pipeline.stop(self.signum)

    def on_signal(self, signum: int) -> None:
        if self.signum is not None:  # a second one: the user will not wait for the batch in progress
            # No summary can follow (the run is cut short here), so say what the user has: every
            # caption written so far (files atomically; a torn JSONL line and a Parquet journal
            # are mended by the next run), and how to go on.
            click.echo(
                "quit at once: the captions written so far are kept; run the same command again "
                "to resume (it mends what this stop cut short)",
                err=True,
            )
            os._exit(128 + signum)
        self.signum = signum
        click.echo("stopping: finishing the writes in progress (press Ctrl+C again to quit now)", err=True)
        if self.pipeline is not None:
            self.pipeline.stop(signum)


def _count_in_background(
    loop: asyncio.AbstractEventLoop, request: CaptionRequest, read: ReadOptions, progress: Progress
) -> threading.Thread:
    """Count the images while captioning starts, so the bar gets a total and an ETA (and a run
    the model's load stopped can say how many are left)."""

    def count() -> None:
        try:
            total = count_images(request.inputs, read)
        except Exception:  # counting is only for the display
            log.debug("counting the images failed", exc_info=True)
            return
        if total is not None:
            loop.call_soon_threadsafe(progress.set_total, total)

    counting = threading.Thread(target=count, name="vision-bulk-count", daemon=True)
    counting.start()
    return counting
