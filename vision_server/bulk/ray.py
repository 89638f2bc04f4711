"""``vision-server caption --ray``: the dataset captioner as a Ray Data pipeline.

read (bulk's readers, :mod:`~vision_server.bulk.ray_source`) → decode and resize in CPU
``map_batches`` tasks → caption in actors, one model each (one per GPU, or CPU actors when the
cluster has none) → rows stream back to this process, which writes them with bulk's outputs.
So sidecars, JSONL and Parquet get the same rows, the same atomic writes and the same resume as
the local path; Ray's backpressure bounds what is in flight. Sidecars are written by this
process, so they need the image paths to be visible here (local paths or a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vision_server.bulk.outputs import Captions, Output, close_all, write_all
from vision_server.bulk.pipeline import Outcome, Summary
from vision_server.bulk.plan import Fail, Skip, Unit, Work, plan
from vision_server.bulk.progress import Progress, format_load_failure, format_summary
from vision_server.bulk.readers import ReadOptions, iter_records
from vision_server.bulk.records import Record
from vision_server.disk_full import DiskFull
from vision_server.settings import Settings, SettingsError

if TYPE_CHECKING:
    from vision_server.bulk.command import CaptionRequest

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "vision-server[ray]"'
PREPARE_BATCH = 8  # images per decode task: enough to amortise a task, small enough to spread
# Room for a batch of full-size decodes (a 12-megapixel JPEG is 36 MB decoded). Also keeps the
# decode tasks apart from CPU caption actors: Ray fuses stages whose resources are equal.
PREPARE_MEMORY = 512 * 1024 * 1024
CALLS_PER_ACTOR = 3  # batches an actor holds at once: one captioning, the next ones queued


def require_ray() -> None:
    """Bad usage (exit 2) when Ray Data is not installed, before anything is loaded."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise click.UsageError(
            f"--ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}"
        ) from None


@dataclass(frozen=True)
class _Job:
    """What one ``--ray`` run captions and where the captions go, as the command checked them."""

    settings: Settings
    request: CaptionRequest
    read: ReadOptions
    kinds: dict[Path, str]  # each input's kind (command._check_inputs)
    tasks: tuple[str, ...]
    outputs: list[Output]


# How each image's outcome is counted and shown (the summary and the progress line), whether it
# was planned on the driver or captioned by an actor.
Report = Callable[[Outcome, Record, str | None], None]


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _LoadFailed(Exception):
    """An actor's model did not load: the run stops, as the local path's does."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class _Tally:
    """The run's summary and progress display, told about every image as its outcome is known,
    whether it was planned on the driver or captioned by an actor."""

    def __init__(self, progress: Progress) -> None:
        self.summary = Summary()
        self.progress = progress
        self.total: int | None = None  # images in the inputs, when they could be counted
        self.load_error: str | None = None  # why the model did not load; the run stopped there

    def report(self, outcome: Outcome, record: Record, reason: str | None) -> None:
        self.summary.record(outcome, record.display, reason)
        self.progress.report(self.summary, outcome, record.display, reason)

    def planned(self, planned: _Planned) -> None:
        self.total = planned.total
        if planned.total is not None:
            self.progress.set_total(planned.total)
        for unit in planned.skipped:
            self.report("skipped", unit.record, unit.reason)

    def run_failed(self, exc: Exception) -> None:
        """A failed actor or task: what was written stays, a rerun resumes."""
        log.debug("the Ray run failed", exc_info=True)
        click.echo(f"error: the Ray run failed: {_last_line(exc)}", err=True)
        self.summary.failed += 1
        self.summary.failures.append(("(the run)", _last_line(exc)))

    def conclude(self, limited: bool) -> int:
        """Print the summary (and a failed load's cause and what is left); the exit status."""
        summary = self.summary
        summary.seconds = time.monotonic() - summary.started
        click.echo(format_summary(summary), err=True)
        if self.load_error is None:
            return summary.exit_status
        total = None if limited else self.total  # with --limit the inputs' count is not what is left
        click.echo(format_load_failure(summary, self.load_error, total), err=True)
        return summary.exit_status if summary.interrupted is not None else 1


def run_ray(
    settings: Settings,
    request: CaptionRequest,
    read: ReadOptions,
    kinds: dict[Path, str],
    tasks: tuple[str, ...],
    outputs: list[Output],
) -> int:
    """Run the request on Ray; the exit status as the local path gives it."""
    assert request.ray is not None, "run_ray is the --ray path"
    job = _Job(settings, request, read, kinds, tasks, outputs)
    tally = _Tally(Progress(interval=request.progress_interval))
    undo = _stop_on_signals()
    started = False
    closed = True
    try:
        # Files, folders and lists are planned here, before Ray starts: a rerun that finds them
        # all captioned (and has no Parquet of image bytes or tar shard, which the workers plan)
        # ends without starting or joining Ray, so no actor loads a model.
        planned = _plan_here(job)
        tally.planned(planned)
        if not planned.remote and not any(isinstance(unit, Work) for unit in planned.units):
            log.info("nothing left to caption: Ray is not started")
            _fail_here(job, planned, tally)
        else:
            started = _init_ray(request.ray, settings)
            if not started:
                return 2
            _caption_on_ray(job, planned, tally)
    except _Stop as stop:
        tally.summary.interrupted = stop.signum
    except DiskFull as exc:  # every row after this one would fail the same way: stop, say it once
        tally.summary.stopped = str(exc)
    finally:
        closed = _close(outputs, tally.progress, started)
        undo()
    # An output that could not be closed (a fold that found the disk full) lacks rows, as locally.
    return tally.conclude(request.limit is not None) or (0 if closed else 1)


def _fail_here(job: _Job, planned: _Planned, tally: _Tally) -> None:
    """With nothing to caption: the images that fail before decoding (a shared caption file)."""
    for failing in planned.units:
        assert isinstance(failing, Fail)
        _, problem = write_all(job.outputs, failing.record, {}, failing.reason)
        tally.report("failed", failing.record, problem)


def _caption_on_ray(job: _Job, planned: _Planned, tally: _Tally) -> None:
    try:
        _caption(job, planned, tally.report)
    except _LoadFailed as failed:
        tally.load_error = failed.cause
    except (_Stop, click.UsageError, DiskFull):
        raise
    except Exception as exc:
        tally.run_failed(exc)


def _close(outputs: list[Output], progress: Progress, started: bool) -> bool:
    """Close the outputs, the progress line and Ray; whether every output closed."""
    closed = close_all(outputs)
    progress.close()
    if started:
        import ray

        ray.shutdown()
    return closed


def _init_ray(address: str, settings: Settings) -> bool:
    import ray

    # Ray's own log lines (a token warning as it starts, say) come before the command's; its
    # warnings only at --log-level debug: the command reports what fails itself.
    level = logging.WARNING if settings.log_level.lower() == "debug" else logging.ERROR
    try:
        if address == "local":  # a new runtime of our own, even when RAY_ADDRESS names a cluster
            ray.init(address="local", include_dashboard=False, logging_level=level)
        else:
            ray.init(address=address, logging_level=level)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        click.echo(f"error: cannot join the Ray cluster at {address!r}: {_last_line(exc)}", err=True)
        return False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own progress and errors say it all
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws its own
    context.print_on_execution_start = False
    return True


def _caption(job: _Job, planned: _Planned, report: Report) -> None:
    """Caption on the cluster what ``planned`` holds; write and report each row as it comes back."""
    from vision_server.bulk.ray_rows import batch_rows

    for batch in _captioned_batches(job, planned):
        unloaded = ""
        for row in batch_rows(batch):
            cause = _store_row(job, row, report)
            unloaded = unloaded or cause
        if unloaded:  # after the batch, whose bad images are reported as failed
            raise _LoadFailed(unloaded)


def _store_row(job: _Job, row: dict[str, Any], report: Report) -> str:
    """Write one row that came back to every output and report it; why the model did not load
    when that left it uncaptioned (the run stops after its batch), else ""."""
    from vision_server.bulk.ray_rows import row_record

    record = row_record(row)
    if str(row["skip"]):
        report("skipped", record, str(row["skip"]))
        return ""
    if str(row["unloaded"]):  # no model: the image is simply not captioned yet
        return str(row["unloaded"])
    captions: Captions = json.loads(str(row["captions"]))
    error = str(row["error"]) or None
    skipped, reason = write_all(job.outputs, record, captions, error)
    report("skipped" if skipped else "failed" if reason else "captioned", record, reason)
    return ""


@dataclass(frozen=True)
class _Actors:
    """How the caption stage runs on this cluster: how many actors, what each takes, batch size."""

    count: int
    resources: dict[str, Any]
    torch_threads: int | None  # CPU actors: the node's cores shared among its actors
    batch_size: int


def _actors(job: _Job, cpus: int) -> _Actors:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    count = job.request.ray_actors or gpus or nodes
    if gpus and count > gpus:
        raise click.UsageError(f"--ray-actors {count}: the cluster has {gpus} GPUs (one actor each)")
    threads = None
    if not gpus:  # Ray gives a 1-CPU actor one torch thread; a CPU model wants the machine's cores
        per_node = cpus // nodes
        threads = max(1, per_node // math.ceil(count / nodes))
    resources: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    return _Actors(count, resources, threads, job.settings.max_batch_size or (32 if gpus else 16))


def _captioned_batches(job: _Job, planned: _Planned) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline (read, decode in CPU tasks, caption in actors) and its batches of
    rows as they come back."""
    import ray

    from vision_server.bulk.ray_source import CaptionSource, snapshot
    from vision_server.bulk.ray_stages import CaptionActor, prepare_batch

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pieces = planned.pieces(cpus)
    actors = _actors(job, cpus)
    settings = job.settings
    spec = _pixel_spec(settings)

    dataset = ray.data.read_datasource(
        CaptionSource(pieces, job.tasks, ray.put(snapshot(job.outputs))), override_num_blocks=len(pieces)
    )
    dataset = dataset.map_batches(
        prepare_batch,
        fn_kwargs={"spec": spec, "max_pixels": settings.max_image_pixels},
        batch_size=PREPARE_BATCH,
        batch_format="numpy",
        num_cpus=1,
        memory=PREPARE_MEMORY,
    )
    dataset = dataset.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"settings": settings, "torch_threads": actors.torch_threads},
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors.count,
            max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
            enable_true_multi_threading=True,
        ),
        **actors.resources,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


@dataclass
class _Planned:
    """What the driver planned before Ray starts: the read tasks of Parquet files of image bytes
    and tar shards (``remote``, planned by the workers), the images of files, folders and lists
    still to caption (``units``, failures included), those already done, and the total."""

    remote: list[Any]
    units: list[Unit]
    skipped: list[Skip]
    total: int | None

    def pieces(self, cpus: int) -> list[Any]:
        """Every read task: enough to keep every CPU decoding, few enough that each is worth a
        task; small tasks also stream (a task's rows go on to the model when it has finished)."""
        from vision_server.bulk.ray_source import MIN_PATHS_PER_TASK, PATHS_PER_TASK, PlannedRows

        units = self.units
        size = max(MIN_PATHS_PER_TASK, min(PATHS_PER_TASK, len(units) // (4 * cpus)))
        chunks = [PlannedRows(tuple(units[start : start + size])) for start in range(0, len(units), size)]
        return [*self.remote, *chunks]


def _plan_here(job: _Job) -> _Planned:
    """Plan on the driver what is planned here, and list the read tasks the workers plan.

    With ``--limit`` everything is planned here, in input order, exactly as the local path plans
    it (at most ``limit`` images are shipped); otherwise Parquet files of image bytes and tar
    shards are read and planned by the workers.
    """
    from vision_server.bulk.ray_source import Shard, row_group_pieces

    remote: list[Any] = []
    skipped: list[Skip] = []
    total: int | None = 0
    local: list[Path] = []
    request, read = job.request, job.read
    for path in request.inputs:
        kind = job.kinds[path]
        groups = row_group_pieces(path, read) if kind == "parquet-bytes" and request.limit is None else None
        if groups is not None:
            remote.extend(groups)
            total = None if total is None else total + sum(group.rows for group in groups)
        elif kind == "webdataset" and request.limit is None:
            remote.append(Shard(path))
            total = None
        else:
            local.append(path)
    units: list[Unit] = []
    for unit in plan(iter_records(local, read), job.tasks, job.outputs, request.limit):
        total = None if total is None else total + 1
        if isinstance(unit, Skip):
            skipped.append(unit)
        else:
            units.append(unit)
    return _Planned(remote, units, skipped, total)


def _pixel_spec(settings: Settings) -> Any:
    """The model's input size, known from its files before (and without) loading the weights.

    Building it finds a bad setting (an adapter gone since planning checked it): the run stops
    as for a model that does not load, as the local path's does (:class:`_LoadFailed`)."""
    from vision_server.runtime import build_captioner

    try:
        return build_captioner(settings).pixel_spec
    except SettingsError as exc:
        raise _LoadFailed(str(settings.located(exc))) from None


def _stop_on_signals() -> Any:
    """Ctrl+C/SIGTERM: stop reading results, close the outputs cleanly; a second one quits now."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stopping:
            os._exit(128 + signum)
        stopping.append(signum)
        print("stopping: closing the outputs (press Ctrl+C again to quit now)", file=sys.stderr, flush=True)
        raise _Stop(signum)

    for signum in previous:
        signal.signal(signum, handler)

    def undo() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return undo


# "RuntimeError: the model did not load: ..." in a task's traceback; Ray's own wrappers
# (ray.exceptions.UserCodeException) and the retry advice after them say nothing about the cause.
_CAUSE_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:Error|Exception): ")


def _last_line(exc: BaseException) -> str:
    """What went wrong, in one line: the last error line of the user code's traceback that Ray
    wraps a failed task's exception in, else the message's last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    causes = [line for line in lines if _CAUSE_LINE.match(line)]
    if causes:
        return causes[-1]
    return lines[-1] if lines else type(exc).__name__
