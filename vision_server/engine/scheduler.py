"""The engine: bounded queues and one worker coroutine that is the only owner of the models.

Every batch runs in one dedicated model thread, driven by the worker coroutine, so the event loop
stays free and no lock is needed: admin actions and shutdown are messages the worker handles
between batches. With several models (:class:`~vision_server.engine.models.NamedModel`) each has
its own queue and lifecycle; a load runs on a second thread while another model is ready, so
jobs for a ready model never wait behind a load. The rules (fairness between models, eviction
under ``memory_budget``) are described in docs/several-models.md.

:class:`Engine` is the front: submitting jobs, admin actions, names and cards, status, and the
worker's start, restart and stop. What the worker does lives beside it, one concept a module:
its turns (:mod:`~vision_server.engine.worker`), whose turn it is (:mod:`~vision_server.engine.turns`),
batches (:mod:`~vision_server.engine.batches`), admin messages
(:mod:`~vision_server.engine.commands`), idle timers (:mod:`~vision_server.engine.timers`),
model lifecycle moves (:mod:`~vision_server.engine.keeper`), memory room
(:mod:`~vision_server.engine.room`) and the status snapshot (:mod:`~vision_server.engine.report`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from vision_server.captioner import Caption, Captioner, CaptionItem
from vision_server.engine.batches import BatchRunner
from vision_server.engine.clock import Clock, MonotonicClock
from vision_server.engine.commands import AdminCommands, Command
from vision_server.engine.config import EngineConfig
from vision_server.engine.jobs import CaptionJob, JobLabels, Lane, fail
from vision_server.engine.keeper import ModelKeeper
from vision_server.engine.lifecycle import EngineStatus, ModelCard, ModelState
from vision_server.engine.models import NamedModel
from vision_server.engine.observer import EngineObserver
from vision_server.engine.queue import JobQueue
from vision_server.engine.report import engine_status
from vision_server.engine.room import MemoryRoom
from vision_server.engine.slots import ModelSlot, resolve_name
from vision_server.engine.timers import IdleTimers, granted_keep_alive
from vision_server.engine.trace import record_job
from vision_server.engine.turns import Turns
from vision_server.engine.wait import backlog_seconds
from vision_server.engine.worker import WorkerLoop
from vision_server.errors import (
    DeadlineExceeded,
    Draining,
    QueueFull,
    VisionServerError,
    WorkerUnavailable,
)
from vision_server.images import PixelSpec

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120.0
STOP_MARGIN = 3.0  # seconds past the shutdown grace for the unload before the worker is abandoned

Models = Captioner | Sequence[NamedModel]


def _named_models(models: Models, default_model: str | None) -> list[NamedModel]:
    """The models as named entries; refuse none at all, a name twice, or an unknown default."""
    named = list(models) if isinstance(models, Sequence) else [NamedModel(models.model_id, models)]
    if not named:
        raise ValueError("an engine needs at least one model")
    names = [model.name for model in named]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, not {names}")
    if default_model is not None and default_model not in names:
        raise ValueError(f"default model {default_model!r} is not one of {', '.join(names)}")
    return named


class Engine:
    """Queues + worker + the models' lifecycles. Usable in-process: ``await engine.submit(item)``.

    ``models`` is one captioner (served under its model id) or several :class:`NamedModel`; the
    first is the default unless ``default_model`` names another.
    """

    def __init__(
        self,
        models: Models,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        clock: Clock | None = None,
        *,
        default_model: str | None = None,
    ) -> None:
        named = _named_models(models, default_model)
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._clock = clock or MonotonicClock()
        self._default = default_model or named[0].name
        self._wakeup = asyncio.Event()  # the worker's one reason to look again (see WorkerLoop)
        self._slots: dict[str, ModelSlot] = {
            model.name: ModelSlot(
                model,
                JobQueue(self.config.max_queue, bulk_aging=self.config.bulk_aging, arrived=self._wakeup),
                idle_timeout=self.config.idle_timeout if model.idle_timeout is None else model.idle_timeout,
                default=model.name == self._default,
                now=self._clock.now(),
            )
            for model in named
        }
        self._keeper = ModelKeeper(
            self._slots,
            self.observer,
            self._clock,
            self._wakeup,
            offload_timeout=self.config.offload_timeout,
            log_load_failures=self.config.log_load_failures,
        )
        self._room = MemoryRoom(self.config.memory_budget, self._slots, self._keeper)
        self._commands = AdminCommands(self._slots, self._keeper, self._room, self._wakeup)
        self._batches = BatchRunner(self.config, self.observer, self._clock, self._keeper)
        self._turns = Turns(self._slots, self._room, self._keeper)
        self._timers = IdleTimers(self._slots, self._keeper, self._clock, self.config)
        self._work = WorkerLoop(
            self._commands, self._turns, self._batches, self._timers, self._clock, self._wakeup
        )
        self._worker: asyncio.Task[None] | None = None
        self._draining = False
        self._stopping = False
        self._worker_deaths = 0
        self._restart: asyncio.TimerHandle | None = None

    # --- public API ----------------------------------------------------------------------------

    async def start(self, *, preload: bool = False) -> None:
        """Start the worker (and load the default model at once when ``preload``)."""
        self._keeper.start()
        for slot in self._slots.values():
            self._keeper.begin_sizing(slot)
        self._start_worker()
        if preload:
            await self.load()

    async def submit(
        self,
        item: CaptionItem,
        *,
        model: str | None = None,
        request_id: str = "-",
        wait_for_room: bool = False,
        labels: JobLabels | None = None,
    ) -> Caption:
        """Queue one image for ``model`` (the default when None) and wait for its caption.

        Raises domain errors on refusal or failure: :class:`UnknownModel` for a name this engine
        does not serve. ``labels`` say which lane the job waits in and which client it belongs to
        (interactive and anonymous by default). A full lane refuses the job at once, unless
        ``wait_for_room``: then the caller waits for a place (the offline dataset captioner,
        which bounds what it has in flight itself).
        """
        slot = self._slot(model)
        self._check_accepting()
        job = await self._enqueue(slot, item, request_id, labels or JobLabels(), wait_for_room=wait_for_room)
        return await self._caption_of(slot, job)

    async def _enqueue(
        self, slot: ModelSlot, item: CaptionItem, request_id: str, labels: JobLabels, *, wait_for_room: bool
    ) -> CaptionJob:
        """Put a new job with its deadline into ``slot``'s queue, or refuse it (full lane, draining)."""
        if wait_for_room:
            await slot.queue.wait_for_room(labels.lane)
            if self._draining:
                self.observer.job_rejected("draining")
                raise Draining("The server is shutting down; retry on another instance.", retry_after=5)
        job = CaptionJob(
            item,
            asyncio.get_running_loop().create_future(),
            request_id,
            enqueued_at=self._clock.now(),
            labels=labels,
        )
        job.deadline = job.enqueued_at + self.config.request_timeout
        try:
            slot.queue.put(job, retry_after=self.retry_after(labels.lane))
        except VisionServerError:
            self.observer.job_rejected("queue_full")
            raise
        return job

    async def _caption_of(self, slot: ModelSlot, job: CaptionJob) -> Caption:
        """Wait for a queued job's caption; a timeout or a client gone takes it out of the queue."""
        timeout = self.config.request_timeout
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            slot.queue.discard(job)
            self.observer.job_rejected("timeout")
            raise DeadlineExceeded(f"No caption within the request timeout of {timeout:g} s.") from None
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels its handler): free the place at once, so
            # abandoned jobs neither refuse newcomers nor inflate queue_depth and Retry-After.
            slot.queue.discard(job)
            self.observer.job_rejected("client_disconnected")
            raise
        finally:
            if job.queue_wait is not None:
                record_job(job.queue_wait, job.batch_size)

    async def load(self, model: str | None = None) -> EngineStatus:
        await self._command("load", model)
        return self.status()

    async def unload(self, model: str | None = None) -> EngineStatus:
        await self._command("unload", model)
        return self.status()

    async def offload(self, model: str | None = None) -> EngineStatus:
        """Move a loaded model to the warm tier now (400 where there is none: CPU-only, tier off)."""
        await self._command("offload", model)
        return self.status()

    async def stop(self, grace: float = 60.0) -> bool:
        """Refuse new jobs, finish queued and running ones within ``grace`` seconds, unload, stop.

        Ends within ``grace`` plus :data:`STOP_MARGIN` whatever the worker is doing (a model load
        included): jobs it could not finish get 503. Returns False when a model thread was still
        busy and was left behind (the process should then exit without joining it).
        """
        self._draining = True
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        if self._worker is None:
            return True
        end = time.monotonic() + grace
        while self._has_work() and time.monotonic() < end and not self._worker.done():
            await asyncio.sleep(0.05)
        for slot in self._slots.values():
            for job in slot.queue.take_all():
                fail(job, Draining("The server shut down before this job ran.", retry_after=5))
        clean = await self._stop_worker(end + STOP_MARGIN)
        self._worker = None
        await self._keeper.stop_sizing()
        self._keeper.shutdown(wait=clean)
        return clean

    def _has_work(self) -> bool:
        return bool(
            self._batches.running
            or self._batches.in_flight
            or any(len(slot.queue) or slot.busy_loading for slot in self._slots.values())
        )

    async def _stop_worker(self, deadline: float) -> bool:
        """Ask the worker to unload and exit; cancel it at ``deadline``. True when it exited cleanly."""
        worker = self._worker
        assert worker is not None
        if not worker.done():
            stopping = asyncio.ensure_future(self._command("stop", None))
            done, _ = await asyncio.wait({worker}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                log.warning("the worker did not stop in time (busy in the model thread); leaving it behind")
                for job in self._batches.in_flight:
                    fail(job, Draining("The server shut down before this job finished.", retry_after=5))
                worker.cancel()
                stopping.cancel()
                await asyncio.gather(worker, stopping, return_exceptions=True)
                return False
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        await asyncio.gather(worker, return_exceptions=True)
        return True

    # --- which models, and what clients may know of them -----------------------------------------

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every served name, in configured order."""
        return tuple(self._slots)

    @property
    def default_model(self) -> str:
        return self._default

    def resolve(self, name: str | None) -> str:
        """The served name a request's ``model`` means: None or "" is the default model; a model's
        source (hub id or directory) names it too when no other model has that source."""
        return resolve_name(self._slots, self._default, name)

    def _slot(self, name: str | None) -> ModelSlot:
        return self._slots[self.resolve(name)]

    def card(self, name: str | None = None) -> ModelCard:
        """A model's name and tasks (device and dtype once it has loaded); never the model."""
        return self._slot(name).card()

    @property
    def model_card(self) -> ModelCard:
        """The default model's card."""
        return self.card(None)

    def pixel_spec_for(self, name: str | None) -> PixelSpec:
        """The size and normalisation a model's images are prepared for before they queue."""
        return self._slot(name).captioner.pixel_spec

    @property
    def pixel_spec(self) -> PixelSpec:
        """The default model's pixel spec (known unloaded)."""
        return self.pixel_spec_for(None)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> bool:
        """True while the worker is alive, between :meth:`start` and the end of :meth:`stop`."""
        return self._worker is not None and not self._worker.done()

    @property
    def worker_down(self) -> bool:
        """True between an unexpected death of the worker and its restart."""
        return self._worker is not None and self._worker.done() and not self._stopping

    @property
    def worker_restarts(self) -> int:
        return self._worker_deaths

    @property
    def state(self) -> ModelState:
        """The default model's state."""
        return self._slots[self._default].state

    @property
    def keep_alive_cap(self) -> float:
        """The most seconds a request's keep-alive may ask for (negative: no cap)."""
        cap = self.config.max_keep_alive
        return self.config.idle_timeout if cap is None else cap

    def grant_keep_alive(self, seconds: float) -> float:
        """What a request asking for ``seconds`` of keep-alive gets: at most the cap (a 400 for
        "forever" when there is one; see :func:`~vision_server.engine.timers.granted_keep_alive`)."""
        return granted_keep_alive(seconds, self.keep_alive_cap)

    def retry_after(self, lane: Lane | None = None) -> float:
        """An honest estimate of when a refused client should retry, capped for OpenAI SDKs.

        For a lane: the jobs that go before a newcomer there (bulk waits behind everything,
        interactive only behind interactive work), over every model, after the batch and loads in
        progress; before any batch has finished, priced by how long those have run
        (:func:`~vision_server.engine.wait.backlog_seconds`).
        """
        slots = self._slots.values()
        if lane is Lane.INTERACTIVE:
            ahead = sum(slot.depth(Lane.INTERACTIVE) for slot in slots)
        else:
            ahead = sum(slot.depth() for slot in slots)
        loads = [slot.loading_since for slot in slots if slot.loading_since is not None]
        work = self._batches.work_in_progress(loads)
        backlog = backlog_seconds(ahead, work, self._batches.seconds_per_job)
        return float(min(MAX_RETRY_AFTER, max(1.0, round(backlog))))

    def status(self) -> EngineStatus:
        return engine_status(
            self._slots,
            self._default,
            batches=self._batches,
            timers=self._timers,
            room=self._room,
            draining=self._draining,
        )

    def check_room(self, lane: Lane = Lane.INTERACTIVE, model: str | None = None) -> None:
        """Refuse now what :meth:`submit` would refuse (unknown model, full lane, drain, dead
        worker), so no CPU is spent decoding an image that cannot be queued."""
        slot = self._slot(model)
        self._check_accepting()
        if slot.queue.full(lane):
            self.observer.job_rejected("queue_full")
            retry_after = self.retry_after(lane)
            whose = f" of model {slot.name!r}" if len(self._slots) > 1 else ""
            raise QueueFull(
                f"The {lane.value} queue{whose} is full ({self.config.max_queue} jobs waiting); "
                f"retry in {retry_after:.0f} s.",
                retry_after=retry_after,
            )

    def _check_accepting(self) -> None:
        if self._draining or self._worker is None:
            self.observer.job_rejected("draining")
            raise Draining("The server is shutting down; retry on another instance.", retry_after=5)
        if self.worker_down:
            self.observer.job_rejected("worker_unavailable")
            raise WorkerUnavailable(
                "The captioning worker failed and is restarting; retry shortly.",
                retry_after=max(1.0, self.config.worker_restart_delay),
            )

    # --- the worker ----------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self._restart = None
        self._worker = asyncio.create_task(self._work.run(), name="vision-server-worker")
        self._worker.add_done_callback(self._worker_exited)

    def _worker_exited(self, task: asyncio.Task[None]) -> None:
        """A worker that ends outside :meth:`stop` died: fail its jobs, say so, restart it soon."""
        if self._stopping or task is not self._worker:
            return
        self._worker_deaths += 1
        error = task.exception() if not task.cancelled() else asyncio.CancelledError("worker cancelled")
        log.error(
            "the captioning worker died (%s); failing its jobs and restarting it in %g s",
            f"{type(error).__name__}: {error}" if error else "returned",
            self.config.worker_restart_delay,
            exc_info=error if isinstance(error, Exception) else None,
        )
        queued = [job for slot in self._slots.values() for job in slot.queue.take_all()]
        for job in queued:
            fail(job, WorkerUnavailable("The captioning worker failed; retry shortly.", retry_after=1))
        self._batches.abandon(
            self._slots.values(),
            lambda: WorkerUnavailable("The captioning worker failed; retry shortly.", retry_after=1),
        )
        self._commands.fail_all(lambda: WorkerUnavailable("The captioning worker failed; retry shortly."))
        self._restart = asyncio.get_running_loop().call_later(self.config.worker_restart_delay, self._revive)

    def _revive(self) -> None:
        if self._stopping:
            return
        log.warning("restarting the captioning worker (restart %d)", self._worker_deaths)
        self._start_worker()

    async def _command(self, command: Command, model: str | None) -> None:
        if self._worker is None or self._worker.done():
            raise Draining("The engine is not running.")
        await self._commands.send(command, self._slot(model))
