"""The local dataset captioner: reader → decode in worker processes → the engine → writers.

Flow control is the point. At most ``in_flight`` images (a few batches' worth) are between the
reader and the writers at any time, so memory does not grow with the dataset; jobs wait for a
place in the engine's queue instead of being refused; decoding runs in processes so the GIL
never starves the model thread; and writes go through one thread, in the order they finish.

Nothing heavy happens before the first image to caption comes up: the engine (and with it the
captioner, which imports torch and transformers) is built then, and the model loads then, so a
rerun that finds everything done imports neither (seconds of CPU) nor loads the model (minutes
for a large one), and images that are skipped or fail before the first one to caption are
reported meanwhile. Decoding starts while the model loads (the pixel spec is known from the
model's files).

On a stop request nothing new starts, work in flight is dropped (its images are simply not
captioned yet), writes already started finish, and the outputs close cleanly: a rerun resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Literal, Protocol

from vision_server.bulk.outputs import Captions, Output, write_all
from vision_server.bulk.plan import Fail, Skip, Unit, Work
from vision_server.bulk.prepare import interrupts_held, prepare_record, worker_init
from vision_server.bulk.records import Record
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.disk_full import DiskFull
from vision_server.engine.scheduler import Engine
from vision_server.errors import VisionServerError
from vision_server.images import PixelSpec, PreparedImage

log = logging.getLogger(__name__)

Outcome = Literal["captioned", "skipped", "failed"]
LISTED_FAILURES = 50  # the summary names this many failures; all are reported as they happen
READ_CHUNK = 32  # records planned per hop to the reader thread


@dataclass(frozen=True)
class PipelineConfig:
    tasks: tuple[str, ...]
    options: GenerationOptions
    max_pixels: int
    workers: int  # decoding processes
    # Most images between reader and writers: this many of the engine's batches (one on the
    # model, one waiting, one being decoded), and at least min_in_flight to keep the decoders busy.
    batches_in_flight: int
    min_in_flight: int

    def in_flight(self, batch_size: int) -> int:
        return max(self.batches_in_flight * batch_size, self.min_in_flight)


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first LISTED_FAILURES
    interrupted: int | None = None  # the signal that stopped the run early
    stopped: str | None = None  # why the run stopped early otherwise (a full disk)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.captioned + self.skipped + self.failed

    @property
    def exit_status(self) -> int:
        """The command's exit status: 128 + the signal when stopped, 1 when an image failed, else 0."""
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 1 if self.failed or self.stopped is not None else 0

    def record(self, outcome: Outcome, display: str, reason: str | None) -> None:
        if outcome == "captioned":
            self.captioned += 1
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            if len(self.failures) < LISTED_FAILURES:
                self.failures.append((display, reason or "unknown error"))


class Reporter(Protocol):
    """Progress display: told about every image as soon as its outcome is known."""

    def report(self, summary: Summary, outcome: Outcome, display: str, reason: str | None) -> None: ...


# Builds an engine, not started (imports torch: run in a thread), whose config has
# log_load_failures off: the run says a failed load itself, once, in its summary. A
# VisionServerError it raises (a model that cannot be had) stops the run the same way.
EngineFactory = Callable[[], Engine]


class BulkPipeline:
    """One run over a stream of planned units. When the first image to caption comes up it
    builds the engine with ``make_engine``, starts it and loads its model (:attr:`load_error`
    says why it could not); it stops the engine it built when the run ends."""

    def __init__(
        self,
        make_engine: EngineFactory,
        outputs: Sequence[Output],
        config: PipelineConfig,
        reporter: Reporter,
    ) -> None:
        self._make_engine = make_engine
        self.engine: Engine | None = None  # built with the first image to caption
        self.outputs = list(outputs)
        self.config = config
        self.reporter = reporter
        self.summary = Summary()
        self._stopping = asyncio.Event()
        self._pool: ProcessPoolExecutor | None = None  # started with the first image to caption
        self._slots: asyncio.Semaphore | None = None  # places in flight, sized by the engine's batch
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="vision-bulk-write")
        self._writes: set[asyncio.Future[tuple[bool, str | None]]] = set()
        self._spec: PixelSpec | None = None  # the model's, read with the first image to caption
        self._loading: asyncio.Task[bool] | None = None  # the model's load, once started
        self.load_error: str | None = None  # why the model did not load; the run stopped there

    def stop(self, signum: int) -> None:
        """Stop early (a signal): start nothing new; the run returns once the writes are done."""
        if self.summary.interrupted is None:
            self.summary.interrupted = signum
        self._stopping.set()

    def _disk_full(self, record: Record, exc: DiskFull) -> None:
        """Stop early because an output's disk is full: every image after this one would fail
        the same way. Said once, at once; this image (and those in flight) is left for the rerun."""
        if self.summary.stopped is None:
            self.summary.stopped = str(exc)
            log.error("%s (writing the captions of %s); stopping the run", exc, record.display)
        self._stopping.set()

    async def run(self, units: Iterator[Unit]) -> Summary:
        active: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                chunk = await asyncio.to_thread(_take, units, READ_CHUNK)
                if not chunk:
                    break
                for unit in chunk:
                    if self._stopping.is_set():
                        break
                    if isinstance(unit, Skip):
                        self._report("skipped", unit.record, unit.reason)
                    elif isinstance(unit, Fail):
                        self._store(unit.record, {}, unit.reason)
                    elif (slots := await self._ready_slots()) and await self._acquire(slots):
                        task = asyncio.create_task(self._caption(unit))
                        active.add(task)
                        task.add_done_callback(functools.partial(_finished, active, slots))
            while active and not self._stopping.is_set():
                stopper = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait({*active, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
            if self.load_error is not None and self.summary.interrupted is None:
                # No model: the images being decoded end now (a bad file is reported as failed,
                # a good one is left for the rerun), so the summary has every failure known.
                await asyncio.gather(*active, return_exceptions=True)
        finally:
            for task in active:
                task.cancel()
            await asyncio.gather(*active, return_exceptions=True)
            if self._loading is not None and not self._loading.done():  # stopped while loading
                self._loading.cancel()
                await asyncio.gather(self._loading, return_exceptions=True)
            await asyncio.gather(*self._writes, return_exceptions=True)
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=True)
            if self.engine is not None:
                await self.engine.stop(grace=0)
            self.summary.seconds = time.monotonic() - self.summary.started
        return self.summary

    async def _acquire(self, slots: asyncio.Semaphore) -> bool:
        """A place for one more image in flight; False when the run is stopping instead."""
        acquire = asyncio.ensure_future(slots.acquire())
        stopper = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({acquire, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stopping.is_set():
                slots.release()
                return False
            return True
        acquire.cancel()
        return False

    async def _ready_slots(self) -> asyncio.Semaphore | None:
        """The places in flight; with the first image to caption, build and start the engine
        and start the decoders (the model loads with the first image that decodes: see
        :meth:`_model_loaded`). None when the run stopped meanwhile (a signal while torch was
        being imported), or when no engine could be built (:attr:`load_error` says why)."""
        if self._slots is not None:
            return self._slots
        building = asyncio.ensure_future(asyncio.to_thread(self._make_engine))
        stopper = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({building, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if self._stopping.is_set():  # stopped: an import cannot be cut short; the run ends after it
            await asyncio.gather(building, return_exceptions=True)
            return None
        try:
            engine = self.engine = building.result()
        except VisionServerError as exc:  # no model to load: stop, as for a failed load
            self.load_error = exc.message
            self._stopping.set()
            return None
        await engine.start()
        self._pool = self._new_pool()
        self._spec = engine.pixel_spec  # known from the model's files, before the load
        self._slots = asyncio.Semaphore(self.config.in_flight(engine.config.max_batch_size))
        return self._slots

    def _model_loaded(self, record: Record) -> asyncio.Future[bool]:
        """The model's load, started by the first image that decoded (``record``).

        Not by the first image to caption: a rerun whose images left are files that still do
        not decode (a truncated download, a file that is no image) reports them again without
        loading a model of gigabytes for nothing. The others keep decoding while it loads.
        """
        if self._loading is None:
            failed = f", {self.summary.failed} failed" if self.summary.failed else ""
            log.info(
                "loading the model for %s, the first image to caption (%d skipped%s before it)",
                record.display,
                self.summary.skipped,
                failed,
            )
            self._loading = asyncio.create_task(self._load())
        return asyncio.shield(self._loading)

    async def _load(self) -> bool:
        """Whether the model loaded; a failure stops the run (every image would fail the same
        way) and is kept in :attr:`load_error` to be said once, not once per image."""
        assert self.engine is not None
        try:
            await self.engine.load()
        except VisionServerError as exc:  # nothing can be captioned: stop, say it once
            self.load_error = self.engine.status().last_error or exc.message  # the cause alone
            self._stopping.set()
            return False
        # The size read before the load is a guess for a model whose backend is picked as it
        # loads (--backend auto): decode the images still to come at the size the loaded model
        # wants, so they are not all resized a second time on the model's thread.
        self._spec = self.engine.pixel_spec
        return True

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent runs torch threads, which a forked child must not inherit.
        context = multiprocessing.get_context("spawn")
        with interrupts_held():  # its helper processes start now
            return ProcessPoolExecutor(self.config.workers, mp_context=context, initializer=worker_init)

    async def _prepare(self, record: Record) -> PreparedImage | str:
        pool = self._pool
        assert pool is not None
        config = self.config
        assert self._spec is not None, "set when the first image to caption came up"
        try:
            with interrupts_held():  # the pool starts its workers as work arrives
                future = pool.submit(prepare_record, record, self._spec, config.max_pixels)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            if self._pool is pool:  # a decoder process died (killed for memory?): start afresh
                log.warning("a decoding process died; starting new ones")
                self._pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            return "the decoding process died on this image (out of memory?)"

    async def _caption(self, work: Work) -> None:
        record = work.record
        prepared = await self._prepare(record)  # decoding overlaps the model's load
        if isinstance(prepared, str):
            await self._stored(record, {}, prepared)
            return
        assert self.engine is not None
        if not await self._model_loaded(record):
            return  # no model: the image is simply not captioned (the run reports why, once)
        captions, error = await caption_image(
            self.engine, prepared, work.tasks, self.config.options, request_id=record.display
        )
        await self._stored(record, captions, error)

    async def _stored(self, record: Record, captions: Captions, error: str | None) -> None:
        """:meth:`_store`, waited for (a stop does not cut the write short); a full disk is
        handled there, as the run's stop."""
        with contextlib.suppress(DiskFull):
            await asyncio.shield(self._store(record, captions, error))

    def _store(
        self, record: Record, captions: Captions, error: str | None
    ) -> asyncio.Future[tuple[bool, str | None]]:
        """Write to every output on the writer thread; report the outcome once written."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._writer, write_all, self.outputs, record, captions, error)
        self._writes.add(future)

        def done(written: asyncio.Future[tuple[bool, str | None]]) -> None:
            self._writes.discard(written)
            if not written.cancelled() and isinstance(written.exception(), DiskFull):
                self._disk_full(record, written.exception())  # type: ignore[arg-type]
                return
            if written.cancelled():
                skipped, reason = False, error
            elif written.exception() is not None:
                skipped, reason = False, f"cannot write the caption ({written.exception()})"
            else:
                skipped, reason = written.result()
            self._report("skipped" if skipped else "failed" if reason else "captioned", record, reason)

        future.add_done_callback(done)
        return future

    def _report(self, outcome: Outcome, record: Record, reason: str | None) -> None:
        self.summary.record(outcome, record.display, reason)
        self.reporter.report(self.summary, outcome, record.display, reason)


async def caption_image(
    engine: Engine,
    image: PreparedImage,
    tasks: Sequence[str],
    options: GenerationOptions,
    *,
    request_id: str = "-",
) -> tuple[Captions, str | None]:
    """Every task's caption of one prepared image through ``engine`` (waiting for queue room,
    never refused), and what failed, if anything. The tasks join the engine's batches."""
    results = await asyncio.gather(
        *(
            engine.submit(CaptionItem(image, task, options), request_id=request_id, wait_for_room=True)
            for task in tasks
        ),
        return_exceptions=True,
    )
    captions: Captions = {}
    errors: list[str] = []
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            errors.append(_describe(task, result, len(tasks)))
        else:
            captions[task] = result.text
    return captions, "; ".join(errors) or None


def _finished(active: set[asyncio.Task[None]], slots: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
    active.discard(task)
    slots.release()


def _take(units: Iterator[Unit], count: int) -> list[Unit]:
    chunk = []
    for unit in units:
        chunk.append(unit)
        if len(chunk) >= count:
            break
    return chunk


def _describe(task: str, exc: BaseException, tasks: int) -> str:
    message = exc.message if isinstance(exc, VisionServerError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, VisionServerError):
        log.error("captioning failed", exc_info=exc)
    return f"{task}: {message}" if tasks > 1 else message
