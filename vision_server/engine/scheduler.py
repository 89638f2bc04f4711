"""The engine: one bounded queue and one worker coroutine that is the only owner of the model.

Everything that touches the model (load, caption, unload) runs in one dedicated thread, driven
by the worker coroutine, so the event loop stays free and no lock is needed: admin actions and
shutdown are messages the worker handles between batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from vision_server.captioner import Caption, Captioner, CaptionItem, ModelInfo, Offloadable
from vision_server.engine.clock import Clock, MonotonicClock
from vision_server.engine.jobs import CaptionJob, JobLabels, Lane
from vision_server.engine.lifecycle import EngineStatus, ModelCard, ModelState
from vision_server.engine.observer import EngineObserver
from vision_server.engine.queue import DEFAULT_BULK_AGING, JobQueue
from vision_server.engine.trace import record_job
from vision_server.errors import (
    BadRequest,
    CaptionFailed,
    DeadlineExceeded,
    Draining,
    ModelLoadError,
    OutOfMemory,
    QueueFull,
    VisionServerError,
    WorkerUnavailable,
)
from vision_server.images import PixelSpec

log = logging.getLogger(__name__)

LOAD_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 120.0
STOP_MARGIN = 3.0  # seconds past the shutdown grace for the unload before the worker is abandoned

Command = Literal["load", "unload", "offload", "stop"]


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


class Engine:
    """Queue + worker + model lifecycle. Usable in-process: ``await engine.submit(item)``."""

    def __init__(
        self,
        captioner: Captioner,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._captioner = captioner
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._clock = clock or MonotonicClock()
        self._queue = JobQueue(self.config.max_queue, bulk_aging=self.config.bulk_aging)
        self._commands: deque[tuple[Command, asyncio.Future[None]]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._state = ModelState.UNLOADED
        self._info: ModelInfo | None = None
        self._loaded_since: float | None = None
        self._last_error: str | None = None
        self._last_finished = self._clock.now()
        self._running = 0
        self._draining = False
        self._seconds_per_job = 1.0
        self._batches = 0
        self._jobs_done = 0
        self._last_batch_size = 0
        self._in_flight: list[CaptionJob] = []  # the batch the worker holds (loading or running)
        self._stopping = False
        self._worker_deaths = 0
        self._restart: asyncio.TimerHandle | None = None
        self._trim_pending = False  # a batch ran since the last trim (or unload)
        self._keep_alive: float | None = None  # a request's keep-alive in force (None: idle_timeout)
        self._offloaded_at: float | None = None  # on the clock, while in the warm tier

    # --- public API ----------------------------------------------------------------------------

    async def start(self, *, preload: bool = False) -> None:
        """Start the worker (and load at once when ``preload``)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-model")
        self._start_worker()
        if preload:
            await self.load()

    async def submit(
        self,
        item: CaptionItem,
        *,
        request_id: str = "-",
        wait_for_room: bool = False,
        labels: JobLabels | None = None,
    ) -> Caption:
        """Queue one image and wait for its caption (raises domain errors on refusal or failure).

        ``labels`` say which lane the job waits in and which client it belongs to (interactive
        and anonymous by default). A full lane refuses the job at once, unless
        ``wait_for_room``: then the caller waits for a place (the offline dataset captioner,
        which bounds what it has in flight itself).
        """
        self._check_accepting()
        labels = labels or JobLabels()
        timeout = self.config.request_timeout
        if wait_for_room:
            await self._queue.wait_for_room(labels.lane)
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
            self._queue.put(job, retry_after=self.retry_after(labels.lane))
        except VisionServerError:
            self.observer.job_rejected("queue_full")
            raise
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            self._queue.discard(job)
            self.observer.job_rejected("timeout")
            raise DeadlineExceeded(f"No caption within the request timeout of {timeout:g} s.") from None
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels its handler): free the place at once, so
            # abandoned jobs neither refuse newcomers nor inflate queue_depth and Retry-After.
            self._queue.discard(job)
            self.observer.job_rejected("client_disconnected")
            raise
        finally:
            if job.queue_wait is not None:
                record_job(job.queue_wait, job.batch_size)

    async def load(self) -> EngineStatus:
        await self._command("load")
        return self.status()

    async def unload(self) -> EngineStatus:
        await self._command("unload")
        return self.status()

    async def offload(self) -> EngineStatus:
        """Move a loaded model to the warm tier now (400 where there is none: CPU-only, tier off)."""
        await self._command("offload")
        return self.status()

    async def stop(self, grace: float = 60.0) -> bool:
        """Refuse new jobs, finish queued and running ones within ``grace`` seconds, unload, stop.

        Ends within ``grace`` plus :data:`STOP_MARGIN` whatever the worker is doing (a model load
        included): jobs it could not finish get 503. Returns False when the model thread was
        still busy and was left behind (the process should then exit without joining it).
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
        for job in self._queue.take_all():
            _fail(job, Draining("The server shut down before this job ran.", retry_after=5))
        clean = await self._stop_worker(end + STOP_MARGIN)
        self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=clean, cancel_futures=True)
        return clean

    def _has_work(self) -> bool:
        return bool(len(self._queue) or self._running or self._in_flight)

    async def _stop_worker(self, deadline: float) -> bool:
        """Ask the worker to unload and exit; cancel it at ``deadline``. True when it exited cleanly."""
        worker = self._worker
        assert worker is not None
        if not worker.done():
            stopping = asyncio.ensure_future(self._command("stop"))
            done, _ = await asyncio.wait({worker}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                log.warning("the worker did not stop in time (busy in the model thread); leaving it behind")
                for job in self._in_flight:
                    _fail(job, Draining("The server shut down before this job finished.", retry_after=5))
                worker.cancel()
                stopping.cancel()
                await asyncio.gather(worker, stopping, return_exceptions=True)
                return False
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        await asyncio.gather(worker, return_exceptions=True)
        return True

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
        return self._state

    @property
    def model_card(self) -> ModelCard:
        """The model's name and tasks (device and dtype once it has loaded); never the model."""
        info = self._info
        return ModelCard(
            model_id=self._captioner.model_id,
            tasks=self._captioner.tasks,
            device=info.device if info else None,
            dtype=info.dtype if info else None,
        )

    @property
    def pixel_spec(self) -> PixelSpec:
        """The size and normalisation images are prepared for before they queue (known unloaded)."""
        return self._captioner.pixel_spec

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
        interactive only behind interactive work and the running batch).
        """
        ahead = self._queue.depth(Lane.INTERACTIVE) if lane is Lane.INTERACTIVE else len(self._queue)
        backlog = (ahead + self._running) * self._seconds_per_job
        return float(min(MAX_RETRY_AFTER, max(1.0, round(backlog))))

    def status(self) -> EngineStatus:
        info = self._info
        return EngineStatus(
            state=self._state,
            model=self._captioner.model_id,
            device=info.device if info else None,
            dtype=info.dtype if info else None,
            loaded_since=self._loaded_since,
            expires_at=self._expires_at(),
            keep_alive=self._keep_alive_now(),
            keep_alive_from="server" if self._keep_alive is None else "request",
            queue_depth=len(self._queue),
            lane_depths={lane.value: self._queue.depth(lane) for lane in Lane},
            jobs_running=self._running,
            last_error=self._last_error,
            draining=self._draining,
            batches_run=self._batches,
            jobs_done=self._jobs_done,
            last_batch_size=self._last_batch_size,
            mean_batch_size=self._jobs_done / self._batches if self._batches else 0.0,
        )

    def check_room(self, lane: Lane = Lane.INTERACTIVE) -> None:
        """Refuse now what :meth:`submit` would refuse (full lane, drain, dead worker), so no
        CPU is spent decoding an image that cannot be queued."""
        self._check_accepting()
        if self._queue.full(lane):
            self.observer.job_rejected("queue_full")
            retry_after = self.retry_after(lane)
            raise QueueFull(
                f"The {lane.value} queue is full ({self.config.max_queue} jobs waiting); "
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
        for job in [*self._queue.take_all(), *self._in_flight]:
            _fail(job, WorkerUnavailable("The captioning worker failed; retry shortly.", retry_after=1))
        self._in_flight, self._running = [], 0
        while self._commands:
            _, done = self._commands.popleft()
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
                    _fail(job, CaptionFailed("Captioning failed; see the server log."))
                self._in_flight, self._running = [], 0
                await asyncio.sleep(0.1)  # no tight loop should the error repeat

    async def _step(self) -> bool:
        """One turn of the worker: a command, an idle unload or a batch. True when it should exit."""
        if self._commands:
            return await self._handle_command(*self._commands.popleft())
        wake_at = self._next_wake()
        has_job = await self._queue.wait(
            None if wake_at is None else lambda: self._clock.sleep_until(wake_at)
        )
        if self._commands:
            return False
        if not has_job:  # a timeout: the idle unload is due, or the trim after a burst
            idle = self._idle_wait()
            if idle is not None and idle <= 0:
                await self._step_down()  # returns the memory itself
            elif self._trim_pending:
                await self._trim_memory()
            return False
        batch = await self._collect_batch()
        if batch:
            self._in_flight = batch
            try:
                await self._run_batch(batch)
            finally:
                self._in_flight = []
        return False

    async def _command(self, command: Command) -> None:
        if self._worker is None or self._worker.done():
            raise Draining("The engine is not running.")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commands.append((command, done))
        self._queue.wake()
        await done

    async def _handle_command(self, command: Command, done: asyncio.Future[None]) -> bool:
        """Run one control message; True when the worker should exit."""
        try:
            if command == "load":
                if not await self._ensure_loaded():
                    raise ModelLoadError(self._load_error_message(), retry_after=LOAD_RETRY_AFTER)
            elif command == "offload":
                await self._admin_offload()
            else:
                await self._unload("admin" if command == "unload" else "shutdown")
        except VisionServerError as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)
        return command == "stop"

    def _next_wake(self) -> float | None:
        """When (on the clock) the worker has something to do with an empty queue: a trim or an unload."""
        unload_at = self._unload_at()
        if not self._trim_pending:
            return unload_at
        trim_at = self._last_finished + self.config.trim_after
        return trim_at if unload_at is None else min(unload_at, trim_at)

    async def _trim_memory(self) -> None:
        """Hand freed memory back once the queue has stayed empty a while after a burst."""
        self._trim_pending = False
        started = time.monotonic()
        try:
            await self._in_model_thread(self._captioner.trim_memory)
        except Exception:  # never fatal: the memory is merely kept
            log.exception("trimming freed memory failed")
            return
        log.debug("returned freed memory to the OS in %.3f s", time.monotonic() - started)

    def _keep_alive_now(self) -> float:
        """Seconds the model stays loaded after the last batch: a request's wish, else the idle timeout."""
        return self.config.idle_timeout if self._keep_alive is None else self._keep_alive

    def _unload_at(self) -> float | None:
        """When (on the clock) the next idle step down (offload or unload) is due, or None."""
        if self._state is ModelState.OFFLOADED and self._offloaded_at is not None:
            return self._offloaded_at + self.config.offload_timeout
        keep_alive = self._keep_alive_now()
        if self._state is not ModelState.READY or keep_alive < 0:
            return None
        return self._last_finished + keep_alive

    def _idle_wait(self) -> float | None:
        """Seconds until the idle unload is due, or None when no unload is pending."""
        unload_at = self._unload_at()
        return None if unload_at is None else max(0.0, unload_at - self._clock.now())

    def _expires_at(self) -> float | None:
        remaining = self._idle_wait()
        if remaining is None or self._running or len(self._queue):
            return None
        return time.time() + remaining

    async def _collect_batch(self) -> list[CaptionJob]:
        """Take the head job and its peers, giving stragglers ``max_batch_wait`` to join when busy.

        A lone job after a lone job (one client captioning one image at a time) does not wait:
        nobody is coming, and the wait would be pure latency.
        """
        self._queue.drop_abandoned()
        if not len(self._queue):
            return []
        head = self._queue.leader()
        assert head is not None
        limit = self.config.max_batch_size
        waiting = self._queue.count_compatible(head.batch_key)
        busy = waiting > 1 or self._last_batch_size > 1
        if self.config.max_batch_wait > 0 and busy and waiting < limit:
            await self._clock.sleep_until(self._clock.now() + self.config.max_batch_wait)
        return self._queue.take_batch(limit)

    async def _run_batch(self, batch: list[CaptionJob]) -> None:
        if not await self._ensure_loaded():
            error = self._load_error_message()
            for job in [*batch, *self._queue.take_all()]:
                _fail(job, ModelLoadError(error, retry_after=LOAD_RETRY_AFTER))
            return
        live = self._drop_expired(batch)
        if not live:
            return
        now = self._clock.now()
        for job in live:
            job.started_at, job.batch_size = now, len(live)
            self.observer.job_started(now - job.enqueued_at)
        self._running = len(live)
        started = time.monotonic()
        try:
            results = await self._in_model_thread(self._caption_splitting, [job.item for job in live])
            if len(results) != len(live):
                raise RuntimeError(f"the captioner returned {len(results)} results for {len(live)} images")
        except Exception as exc:  # a failed batch must never kill the worker
            self._fail_batch(live, exc)
            return
        finally:
            self._finish_batch(len(live), time.monotonic() - started)
            self._apply_keep_alive(live)
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
                _fail(job, DeadlineExceeded("The request timed out while waiting in the queue."))
            else:
                live.append(job)
        return live

    def _finish_batch(self, size: int, seconds: float) -> None:
        self._running = 0
        self._trim_pending = True
        self._last_finished = self._clock.now()
        self._batches += 1
        self._jobs_done += size
        self._last_batch_size = size
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (seconds / max(size, 1))
        self.observer.batch_finished(size, seconds)

    def _apply_keep_alive(self, batch: list[CaptionJob]) -> None:
        """The latest request of the batch that asked for a keep-alive sets the one in force."""
        asked = [job for job in batch if job.labels.keep_alive is not None]
        if asked:
            self._keep_alive = max(asked, key=lambda job: job.enqueued_at).labels.keep_alive

    def _fail_batch(self, jobs: list[CaptionJob], exc: Exception) -> None:
        ids = ", ".join(job.request_id for job in jobs)
        if isinstance(exc, VisionServerError):
            log.warning("batch failed (%s): %s", ids, exc)
        else:
            log.error("caption batch failed for request(s) %s", ids, exc_info=exc)
        for job in jobs:
            _fail(job, exc if isinstance(exc, VisionServerError) else _caption_failed(exc, job.request_id))

    def _caption_splitting(self, items: list[CaptionItem]) -> list[Caption]:
        """Caption ``items``; on out-of-memory retry each half, down to single images."""
        try:
            return self._captioner.caption(items)
        except OutOfMemory:
            if len(items) == 1:
                raise
            log.warning("out of memory on a batch of %d; retrying in halves", len(items))
            middle = len(items) // 2
            return self._caption_splitting(items[:middle]) + self._caption_splitting(items[middle:])

    # --- model lifecycle -----------------------------------------------------------------------

    async def _ensure_loaded(self) -> bool:
        if self._state is ModelState.READY:
            return True
        if self._state is ModelState.OFFLOADED and await self._wake():
            return True
        self._set_state(ModelState.LOADING)
        started = time.monotonic()
        try:
            self._info = await self._in_model_thread(self._captioner.load)
        except Exception as exc:  # load errors are reported, never fatal
            self._last_error = (
                exc.message if isinstance(exc, VisionServerError) else f"{type(exc).__name__}: {exc}"
            )
            log.error(
                "model load failed: %s", self._last_error, exc_info=not isinstance(exc, VisionServerError)
            )
            self._set_state(ModelState.FAILED)
            self.observer.model_loaded(time.monotonic() - started, ok=False)
            return False
        seconds = time.monotonic() - started
        self._last_error = None
        self._loaded_since = time.time()
        self._last_finished = self._clock.now()
        self._set_state(ModelState.READY)
        self.observer.model_loaded(seconds, ok=True)
        log.info(
            "model %s loaded on %s (%s) in %.2f s",
            self._captioner.model_id,
            self._info.device,
            self._info.dtype,
            seconds,
        )
        return True

    # --- the warm tier ---------------------------------------------------------------------------

    def _tier_available(self) -> bool:
        """Whether an idle model goes to host memory first: the tier is on and helps this device."""
        captioner = self._captioner
        return (
            self.config.offload_timeout > 0 and isinstance(captioner, Offloadable) and captioner.can_offload
        )

    async def _step_down(self) -> None:
        """The idle timeout (or a keep-alive) ran out: ready → offloaded → unloaded, one step."""
        if self._state is ModelState.READY and self._tier_available():
            await self._offload("idle")
        else:
            await self._unload("idle")

    async def _admin_offload(self) -> None:
        if self._state is not ModelState.READY:
            return  # nothing loaded to move (or already offloaded)
        if not self._tier_available():
            raise BadRequest(
                "This server has no warm tier: the model runs on the CPU, or --offload-timeout is 0. "
                "Use /v1/model/unload to free the memory."
            )
        await self._offload("admin")

    async def _offload(self, reason: str) -> None:
        """Move the weights to host memory; a failure frees them instead (never a broken model)."""
        captioner = self._captioner
        assert isinstance(captioner, Offloadable)
        self._trim_pending = False
        started = time.monotonic()
        try:
            await self._in_model_thread(captioner.offload)
        except Exception:
            log.exception("moving the model to host memory failed; unloading it instead")
            await self._unload(reason)
            return
        self._offloaded_at = self._clock.now()
        self._keep_alive = None  # a keep-alive lasts until the model steps down
        self._set_state(ModelState.OFFLOADED)
        seconds = time.monotonic() - started
        self.observer.model_offloaded(seconds, reason)
        log.info(
            "model moved to host memory (%s) in %.2f s; freed after %g s more",
            reason,
            seconds,
            self.config.offload_timeout,
        )

    async def _wake(self) -> bool:
        """Move offloaded weights back; False (model unloaded, load it anew) when that fails."""
        captioner = self._captioner
        assert isinstance(captioner, Offloadable)
        self._set_state(ModelState.LOADING)
        started = time.monotonic()
        try:
            self._info = await self._in_model_thread(captioner.restore)
        except Exception:
            log.exception("moving the model back from host memory failed; loading it from disk")
            self._set_state(ModelState.READY)  # so that _unload drops what is left
            await self._unload("wake_failed")
            return False
        seconds = time.monotonic() - started
        self._offloaded_at = None
        self._last_finished = self._clock.now()
        self._set_state(ModelState.READY)
        self.observer.model_woke(seconds)
        log.info("model woke from host memory in %.2f s (a load from disk would take longer)", seconds)
        return True

    async def _unload(self, reason: str) -> None:
        if self._state not in (ModelState.READY, ModelState.OFFLOADED):
            if self._state is ModelState.FAILED:
                self._set_state(ModelState.UNLOADED)
            return
        self._set_state(ModelState.UNLOADING)
        self._trim_pending = False  # unloading returns the memory itself
        started = time.monotonic()
        try:
            await self._in_model_thread(self._captioner.unload)
        except Exception:
            log.exception("model unload raised; references were dropped anyway")
        self._info = None
        self._loaded_since = None
        self._keep_alive = None  # a request's keep-alive lasts until the unload; the next load starts afresh
        self._offloaded_at = None
        self._set_state(ModelState.UNLOADED)
        seconds = time.monotonic() - started
        self.observer.model_unloaded(seconds, reason)
        log.info("model unloaded (%s) in %.2f s", reason, seconds)

    def _set_state(self, state: ModelState) -> None:
        self._state = state
        self.observer.state_changed(state)

    def _load_error_message(self) -> str:
        return f"The model could not be loaded: {self._last_error}"

    async def _in_model_thread(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)


def _caption_failed(exc: Exception, request_id: str) -> CaptionFailed:
    return CaptionFailed(
        f"Captioning failed ({type(exc).__name__}); see the server log for request id {request_id}."
    )


def _fail(job: CaptionJob, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)
