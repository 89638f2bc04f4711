"""The engine: bounded queues and one worker coroutine that is the only owner of the models.

Every batch runs in one dedicated model thread, driven by the worker coroutine, so the event loop
stays free and no lock is needed: admin actions and shutdown are messages the worker handles
between batches. With several models (:class:`~vision_server.engine.models.NamedModel`) each has
its own queue and lifecycle; a load runs on a second thread while another model is ready, so
jobs for a ready model never wait behind a load. The rules (fairness between models, eviction
under ``memory_budget``) are described in docs/models.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vision_server.captioner import Caption, Captioner, CaptionItem
from vision_server.engine.clock import Clock, MonotonicClock
from vision_server.engine.jobs import CaptionJob, JobLabels, Lane, fail
from vision_server.engine.keeper import LOAD_RETRY_AFTER, ModelKeeper
from vision_server.engine.lifecycle import EngineStatus, ModelCard, ModelState, ModelStatus
from vision_server.engine.models import NamedModel
from vision_server.engine.observer import EngineObserver
from vision_server.engine.queue import DEFAULT_BULK_AGING, JobQueue
from vision_server.engine.room import MemoryRoom
from vision_server.engine.slots import ModelSlot
from vision_server.engine.trace import record_job
from vision_server.errors import (
    BadRequest,
    CaptionFailed,
    DeadlineExceeded,
    Draining,
    ModelLoadError,
    OutOfMemory,
    QueueFull,
    UnknownModel,
    VisionServerError,
    WorkerUnavailable,
)
from vision_server.images import PixelSpec

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120.0
STOP_MARGIN = 3.0  # seconds past the shutdown grace for the unload before the worker is abandoned

Command = Literal["load", "unload", "offload", "stop"]
Models = Captioner | Sequence[NamedModel]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs, separate from :class:`Settings` so the engine needs no HTTP config."""

    max_queue: int = 256  # per lane
    max_batch_size: int = 16
    max_batch_wait: float = 0.005
    idle_timeout: float = 300.0
    request_timeout: float = 600.0
    worker_restart_delay: float = 1.0  # seconds a dead worker stays visibly dead before its restart
    # Seconds the queue must stay empty after a batch before the memory batches and decodes freed
    # is handed back (Captioner.trim_memory): once per burst, not between a client's requests.
    trim_after: float = 1.0
    # Batches in a row that may leave waiting bulk jobs out before one is formed bulk-first.
    bulk_aging: int = DEFAULT_BULK_AGING
    # Most seconds a request's keep-alive may ask for; None: the idle timeout; negative: no cap.
    max_keep_alive: float | None = None
    # Seconds an idle model spends in the warm tier (host memory) before it is freed; 0 skips it.
    offload_timeout: float = 1800.0
    # Bytes the loaded models' weights may take together (device memory; RAM on the CPU). Before a
    # load that would pass it, idle models are unloaded least recently used first. None: no budget.
    memory_budget: int | None = None


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
        named = list(models) if isinstance(models, Sequence) else [NamedModel(models.model_id, models)]
        if not named:
            raise ValueError("an engine needs at least one model")
        names = [model.name for model in named]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, not {names}")
        if default_model is not None and default_model not in names:
            raise ValueError(f"default model {default_model!r} is not one of {', '.join(names)}")
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._clock = clock or MonotonicClock()
        self._default = default_model or names[0]
        # Set on every queued job, finished load and command: the worker's one reason to look again.
        self._wakeup = asyncio.Event()
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
        self._commands: deque[tuple[Command, ModelSlot, asyncio.Future[None]]] = deque()
        self._keeper = ModelKeeper(
            self._slots, self.observer, self._clock, self._wakeup, offload_timeout=self.config.offload_timeout
        )
        self._room = MemoryRoom(self.config.memory_budget, self._slots, self._keeper)
        self._worker: asyncio.Task[None] | None = None
        self._running = 0
        self._draining = False
        self._seconds_per_job = 1.0
        self._batches = 0
        self._jobs_done = 0
        self._last_batch_size = 0
        self._in_flight: list[CaptionJob] = []  # the batch the worker holds
        self._served_last: str | None = None  # the model whose batch ran last (round robin)
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
        labels = labels or JobLabels()
        timeout = self.config.request_timeout
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
        job.deadline = job.enqueued_at + timeout
        try:
            slot.queue.put(job, retry_after=self.retry_after(labels.lane))
        except VisionServerError:
            self.observer.job_rejected("queue_full")
            raise
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
            self._running
            or self._in_flight
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
                for job in self._in_flight:
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
        if not name:
            return self._default
        if name in self._slots:
            return name
        by_source = [slot.name for slot in self._slots.values() if slot.source == name]
        if len(by_source) == 1:
            return by_source[0]
        raise UnknownModel(
            f"This server does not serve a model named {name!r}. Served: "
            f"{', '.join(self._slots)} (default {self._default}); omit the model to get the default."
        )

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
        """What a request asking for ``seconds`` of keep-alive gets: at most the cap.

        "Forever" (negative) is refused with a 400 when there is a cap, so one client cannot pin
        the model for everyone; a finite wish above the cap is granted the cap.
        """
        cap = self.keep_alive_cap
        if cap < 0:
            return seconds
        if seconds < 0:
            raise BadRequest(
                f"keep_alive {seconds:g} (keep the model loaded indefinitely) is not allowed: this "
                f"server caps keep-alive at {cap:g} s (--max-keep-alive). Ask for {cap:g} s or less."
            )
        return min(seconds, cap)

    def retry_after(self, lane: Lane | None = None) -> float:
        """An honest estimate of when a refused client should retry, capped for OpenAI SDKs.

        For a lane: the jobs that go before a newcomer there (bulk waits behind everything,
        interactive only behind interactive work and the running batch), over every model.
        """
        slots = self._slots.values()
        if lane is Lane.INTERACTIVE:
            ahead = sum(slot.depth(Lane.INTERACTIVE) for slot in slots)
        else:
            ahead = sum(slot.depth() for slot in slots)
        backlog = (ahead + self._running) * self._seconds_per_job
        return float(min(MAX_RETRY_AFTER, max(1.0, round(backlog))))

    def status(self) -> EngineStatus:
        default = self._slots[self._default]
        info = default.info
        slots = self._slots.values()
        return EngineStatus(
            state=default.state,
            model=default.captioner.model_id,
            device=info.device if info else None,
            dtype=info.dtype if info else None,
            loaded_since=default.loaded_since,
            expires_at=self._expires_at(default),
            keep_alive=default.keep_alive_now(),
            keep_alive_from="server" if default.keep_alive is None else "request",
            queue_depth=sum(slot.depth() for slot in slots),
            lane_depths={lane.value: sum(slot.depth(lane) for slot in slots) for lane in Lane},
            jobs_running=self._running,
            last_error=default.last_error,
            draining=self._draining,
            batches_run=self._batches,
            jobs_done=self._jobs_done,
            last_batch_size=self._last_batch_size,
            mean_batch_size=self._jobs_done / self._batches if self._batches else 0.0,
            models=tuple(self._model_status(slot) for slot in slots),
            memory_budget=self.config.memory_budget,
            memory_used=self._room.used(),
        )

    def _model_status(self, slot: ModelSlot) -> ModelStatus:
        card = slot.card()
        return ModelStatus(
            name=slot.name,
            source=slot.source,
            adapter=slot.adapter,
            family=card.family,
            default=slot.default,
            state=slot.state,
            device=card.device,
            dtype=card.dtype,
            memory_bytes=slot.memory_bytes(),
            last_used=slot.last_used,
            loaded_since=slot.loaded_since,
            expires_at=self._expires_at(slot),
            idle_timeout=slot.idle_timeout,
            queue_depth=slot.depth(),
            jobs_running=slot.running,
            waiting_for_memory=slot.waiting_for_memory,
            last_error=slot.last_error,
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
        self._worker = asyncio.create_task(self._run(), name="vision-server-worker")
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
        for job in [*queued, *self._in_flight]:
            fail(job, WorkerUnavailable("The captioning worker failed; retry shortly.", retry_after=1))
        self._in_flight, self._running = [], 0
        for slot in self._slots.values():
            slot.running = 0
        while self._commands:
            _, _, done = self._commands.popleft()
            if not done.done():
                done.set_exception(WorkerUnavailable("The captioning worker failed; retry shortly."))
        self._restart = asyncio.get_running_loop().call_later(self.config.worker_restart_delay, self._revive)

    def _revive(self) -> None:
        if self._stopping:
            return
        log.warning("restarting the captioning worker (restart %d)", self._worker_deaths)
        self._start_worker()

    async def _run(self) -> None:
        while True:
            try:
                if await self._step():
                    return
            except Exception:  # a bug between batches must not end captioning for good
                log.exception("the worker hit an unexpected error; its current jobs fail, it carries on")
                for job in self._in_flight:
                    fail(job, CaptionFailed("Captioning failed; see the server log."))
                self._in_flight, self._running = [], 0
                for slot in self._slots.values():
                    slot.running = 0
                await asyncio.sleep(0.1)  # no tight loop should the error repeat

    async def _step(self) -> bool:
        """One turn of the worker: a command, loads to start, a batch, or a wait for something to
        do (a job, a finished load, an idle unload, a trim). True when it should exit."""
        self._wakeup.clear()  # what happens from here on wakes the wait at the end of this turn
        if self._commands:
            return await self._handle_command(*self._commands.popleft())
        await self._start_loads()
        slot = self._next_to_serve()
        if slot is not None:
            batch = await self._collect_batch(slot)
            if batch:
                self._in_flight = batch
                try:
                    await self._run_batch(slot, batch)
                finally:
                    self._in_flight = []
            return False
        await self._wait_for_work()
        await self._run_timers()
        return False

    async def _wait_for_work(self) -> None:
        """Sleep until something is queued, a load ends, a command comes, or a timer is due."""
        if self._wakeup.is_set():
            return
        wake_at = self._next_wake()
        if wake_at is None:
            await self._wakeup.wait()
            return
        woken = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep_until(wake_at))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def _command(self, command: Command, model: str | None) -> None:
        if self._worker is None or self._worker.done():
            raise Draining("The engine is not running.")
        slot = self._slot(model)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commands.append((command, slot, done))
        self._wakeup.set()
        await done

    async def _handle_command(self, command: Command, slot: ModelSlot, done: asyncio.Future[None]) -> bool:
        """Run one control message; True when the worker should exit."""
        try:
            if command == "load":
                await self._admin_load(slot, done)
                return False
            if command == "offload":
                await self._admin_offload(slot)
            elif command == "unload":
                await self._keeper.finish_load(slot)
                await self._keeper.unload(slot, "admin")
            else:
                for each in self._slots.values():
                    await self._keeper.finish_load(each)
                    await self._keeper.unload(each, "shutdown")
        except VisionServerError as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)
        return command == "stop"

    async def _admin_load(self, slot: ModelSlot, done: asyncio.Future[None]) -> None:
        """Start loading ``slot`` (making room under the budget); ``done`` settles when it ends."""
        if slot.state is ModelState.READY:
            done.set_result(None)
            return
        if not slot.busy_loading:
            await self._keeper.sized(slot)
            await self._room.make_room(slot, for_admin=True)
            self._keeper.begin_load(slot)
        assert slot.loading is not None
        slot.loading.add_done_callback(lambda task: self._settle_admin_load(slot, task, done))

    def _settle_admin_load(
        self, slot: ModelSlot, task: asyncio.Task[bool], done: asyncio.Future[None]
    ) -> None:
        if done.done():
            return
        if not task.cancelled() and task.exception() is None and task.result():
            done.set_result(None)
        else:
            done.set_exception(
                ModelLoadError(self._keeper.load_error_message(slot), retry_after=LOAD_RETRY_AFTER)
            )

    # --- which model runs next -------------------------------------------------------------------

    def _next_to_serve(self) -> ModelSlot | None:
        """The next ready model with waiting jobs, in turn after the one served last.

        Models take turns batch by batch, so a busy model never starves another. A model that
        stands between a waiting model and the memory it needs is not served jobs that came after
        the waiting one's (:meth:`ModelSlot.holds_jobs_before`): it finishes its older jobs, then
        makes room.
        """
        slots = list(self._slots.values())
        if self._served_last in self._slots:
            start = list(self._slots).index(self._served_last) + 1
            slots = slots[start:] + slots[:start]
        waiting = self._memory_waiter_since()
        for slot in slots:
            if slot.state is not ModelState.READY or not len(slot.queue):
                continue
            if waiting is None or slot.holds_jobs_before(waiting):
                return slot
        return None

    def _memory_waiter_since(self) -> float | None:
        """When the oldest job of a model waiting for memory was queued (None: nobody waits)."""
        times = [slot.queue.oldest() for slot in self._slots.values() if slot.waiting_for_memory]
        return min((t for t in times if t is not None), default=None)

    # --- loads under the memory budget -----------------------------------------------------------

    async def _start_loads(self) -> None:
        """Start the load that waiting jobs need (oldest job first), making room first.

        One load at a time; a model whose jobs cannot get room yet waits (``waiting_for_memory``)
        until busy models finish the jobs they had before it. A model whose size is not known yet
        (asked off the event loop when the engine starts) is sized first.
        """
        await self._room.enforce()
        if any(slot.busy_loading for slot in self._slots.values()):
            return
        pending = []
        for slot in self._slots.values():
            if slot.needs_load:
                pending.append(slot)
            else:
                slot.waiting_for_memory = False
        pending.sort(key=lambda slot: slot.queue.oldest() or 0.0)
        for slot in pending:
            if not slot.sized:  # its size decides whether and where it loads: ask, look again then
                self._keeper.begin_sizing(slot)
                return
            if await self._room.make_room(slot):
                slot.waiting_for_memory = False
                self._keeper.begin_load(slot)
                return

    # --- timers: idle step-down and memory trims -------------------------------------------------

    def _next_wake(self) -> float | None:
        """When (on the clock) an idle model is due to step down or to trim, or None."""
        times = []
        for slot in self._slots.values():
            if len(slot.queue) or slot.busy_loading:
                continue
            unload_at = self._unload_at(slot)
            if unload_at is not None:
                times.append(unload_at)
            if slot.trim_pending:
                times.append(slot.last_finished + self.config.trim_after)
        return min(times, default=None)

    async def _run_timers(self) -> None:
        """Step down every idle model whose time is up; trim after a burst that is over."""
        now = self._clock.now()
        for slot in self._slots.values():
            if len(slot.queue) or slot.busy_loading or self._commands:
                continue
            unload_at = self._unload_at(slot)
            if unload_at is not None and unload_at <= now:
                await self._keeper.step_down(slot)  # returns the memory itself
            elif slot.trim_pending and slot.last_finished + self.config.trim_after <= now:
                await self._keeper.trim_memory(slot)

    def _unload_at(self, slot: ModelSlot) -> float | None:
        """When (on the clock) the model's next idle step down (offload or unload) is due, or None."""
        if slot.state is ModelState.OFFLOADED and slot.offloaded_at is not None:
            return slot.offloaded_at + self.config.offload_timeout
        keep_alive = slot.keep_alive_now()
        if slot.state is not ModelState.READY or keep_alive < 0:
            return None
        return slot.last_finished + keep_alive

    def _expires_at(self, slot: ModelSlot) -> float | None:
        unload_at = self._unload_at(slot)
        if unload_at is None or slot.running or len(slot.queue):
            return None
        return time.time() + max(0.0, unload_at - self._clock.now())

    # --- batches ---------------------------------------------------------------------------------

    async def _collect_batch(self, slot: ModelSlot) -> list[CaptionJob]:
        """Take the head job and its peers, giving stragglers ``max_batch_wait`` to join when busy.

        A lone job after a lone job (one client captioning one image at a time) does not wait:
        nobody is coming, and the wait would be pure latency.
        """
        queue = slot.queue
        queue.drop_abandoned()
        if not len(queue):
            return []
        head = queue.leader()
        assert head is not None
        limit = self.config.max_batch_size
        waiting = queue.count_compatible(head.batch_key)
        busy = waiting > 1 or self._last_batch_size > 1
        if self.config.max_batch_wait > 0 and busy and waiting < limit:
            await self._clock.sleep_until(self._clock.now() + self.config.max_batch_wait)
        return queue.take_batch(limit)

    async def _run_batch(self, slot: ModelSlot, batch: list[CaptionJob]) -> None:
        self._served_last = slot.name
        live = self._drop_expired(batch)
        if not live:
            return
        now = self._clock.now()
        for job in live:
            job.started_at, job.batch_size = now, len(live)
            self.observer.job_started(now - job.enqueued_at)
        self._running = slot.running = len(live)
        started = time.monotonic()
        try:
            items = [job.item for job in live]
            results = await self._keeper.in_model_thread(self._caption_splitting, slot.captioner, items)
            if len(results) != len(live):
                raise RuntimeError(f"the captioner returned {len(results)} results for {len(live)} images")
        except Exception as exc:  # a failed batch must never kill the worker
            self._fail_batch(live, exc)
            return
        finally:
            self._finish_batch(slot, len(live), time.monotonic() - started)
            self._apply_keep_alive(slot, live)
        for job, result in zip(live, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _drop_expired(self, batch: list[CaptionJob]) -> list[CaptionJob]:
        now = self._clock.now()
        live = []
        for job in batch:
            if job.abandoned:
                continue
            if now >= job.deadline:
                fail(job, DeadlineExceeded("The request timed out while waiting in the queue."))
            else:
                live.append(job)
        return live

    def _finish_batch(self, slot: ModelSlot, size: int, seconds: float) -> None:
        self._running = slot.running = 0
        slot.trim_pending = True
        slot.last_finished = self._clock.now()
        slot.last_used = time.time()
        self._batches += 1
        self._jobs_done += size
        self._last_batch_size = size
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (seconds / max(size, 1))
        self.observer.batch_finished(size, seconds)

    @staticmethod
    def _apply_keep_alive(slot: ModelSlot, batch: list[CaptionJob]) -> None:
        """The latest request of the batch that asked for a keep-alive sets the model's."""
        asked = [job for job in batch if job.labels.keep_alive is not None]
        if asked:
            slot.keep_alive = max(asked, key=lambda job: job.enqueued_at).labels.keep_alive

    def _fail_batch(self, jobs: list[CaptionJob], exc: Exception) -> None:
        ids = ", ".join(job.request_id for job in jobs)
        if isinstance(exc, VisionServerError):
            log.warning("batch failed (%s): %s", ids, exc)
        else:
            log.error("caption batch failed for request(s) %s", ids, exc_info=exc)
        for job in jobs:
            fail(job, exc if isinstance(exc, VisionServerError) else _caption_failed(exc, job.request_id))

    def _caption_splitting(self, captioner: Captioner, items: list[CaptionItem]) -> list[Caption]:
        """Caption ``items``; on out-of-memory retry each half, down to single images."""
        try:
            return captioner.caption(items)
        except OutOfMemory:
            if len(items) == 1:
                raise
            log.warning("out of memory on a batch of %d; retrying in halves", len(items))
            middle = len(items) // 2
            return self._caption_splitting(captioner, items[:middle]) + self._caption_splitting(
                captioner, items[middle:]
            )

    async def _admin_offload(self, slot: ModelSlot) -> None:
        await self._keeper.finish_load(slot)
        if slot.state is not ModelState.READY:
            return  # nothing loaded to move (or already offloaded)
        if not self._keeper.tier_available(slot):
            raise BadRequest(
                "This server has no warm tier: the model runs on the CPU, or --offload-timeout is 0. "
                "Use /v1/model/unload to free the memory."
            )
        await self._keeper.offload(slot, "admin")


def _caption_failed(exc: Exception, request_id: str) -> CaptionFailed:
    return CaptionFailed(
        f"Captioning failed ({type(exc).__name__}); see the server log for request id {request_id}."
    )
