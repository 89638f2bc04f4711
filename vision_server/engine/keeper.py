"""Moving one engine's models through their lifecycle: load, wake, offload, unload, trim.

The :class:`ModelKeeper` owns the threads the models run in: the model thread, where every batch,
unload and offload runs, and the loader thread, where a model loads while another one is ready
(so that one keeps captioning). The engine's worker decides *when*; the keeper does it and keeps
each :class:`~vision_server.engine.slots.ModelSlot`'s state, the observer and the log in step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from vision_server.captioner import Offloadable
from vision_server.engine.budget import memory_parts
from vision_server.engine.clock import Clock
from vision_server.engine.jobs import fail
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.observer import EngineObserver
from vision_server.engine.slots import RESIDENT, ModelSlot, model_key
from vision_server.errors import ModelLoadError, VisionServerError
from vision_server.model_specs import without_local_path

log = logging.getLogger("vision_server.engine.scheduler")

LOAD_RETRY_AFTER = 30.0


class ModelKeeper:
    """Runs lifecycle moves of the engine's models in the right thread and records them."""

    def __init__(
        self,
        slots: Mapping[str, ModelSlot],
        observer: EngineObserver,
        clock: Clock,
        wakeup: asyncio.Event,
        *,
        offload_timeout: float,
        log_load_failures: bool = True,
    ) -> None:
        self.slots = slots
        self.observer = observer
        self.clock = clock
        self.wakeup = wakeup  # set when a load ends, so the worker looks again
        self.offload_timeout = offload_timeout
        self.log_load_failures = log_load_failures  # EngineConfig.log_load_failures
        self.executor: ThreadPoolExecutor | None = None  # the model thread: every batch
        self.loader: ThreadPoolExecutor | None = None  # loads while another model is ready

    def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-model")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-loader")

    def shutdown(self, *, wait: bool) -> None:
        for executor in (self.executor, self.loader):
            if executor is not None:
                executor.shutdown(wait=wait, cancel_futures=True)

    # --- sizing: a model's first memory answer, off the event loop --------------------------------

    def begin_sizing(self, slot: ModelSlot) -> None:
        """Ask ``slot``'s captioner its memory parts in a thread, once.

        The first answer may read weight files or build a test model's config with transformers
        (seconds when cold), so it never runs on the event loop; later answers are cheap
        (:class:`~vision_server.captioner.MemoryAware`). Until it is in, the slot's memory is
        unknown and the model is not loaded (a load decision needs its size).
        """
        if slot.sizing is None:
            slot.sizing = asyncio.create_task(self._size(slot), name=f"size-{slot.name}")

    async def sized(self, slot: ModelSlot) -> None:
        """Wait until ``slot``'s memory parts are known (asking for them if nobody has yet)."""
        self.begin_sizing(slot)
        assert slot.sizing is not None
        await asyncio.shield(slot.sizing)

    async def _size(self, slot: ModelSlot) -> None:
        try:
            await asyncio.to_thread(memory_parts, slot.captioner)
        except Exception:  # an unknown size: the model still serves, only unbudgeted
            log.exception(
                "model %s could not say how much memory it takes; counted as unknown",
                slot.name,
                extra=model_key(slot),
            )
            slot.size_failed = True
        slot.sized = True
        self.wakeup.set()

    async def stop_sizing(self) -> None:
        """Stop waiting for sizes still being asked (at shutdown)."""
        pending = [slot.sizing for slot in self.slots.values() if slot.sizing and not slot.sizing.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def begin_load(self, slot: ModelSlot) -> None:
        """Load (or wake) ``slot`` in a task: on the loader thread while another model is ready,
        so that model keeps captioning; else on the model thread (a shared base included).
        Its size must be known (:meth:`sized`): which weights it shares decides the thread."""
        assert slot.sized, f"model {slot.name} is loaded before its size is known"
        others_ready = any(
            other.state is ModelState.READY for other in self.slots.values() if other is not slot
        )
        overlap = self.shares_weights(slot)
        executor = self.loader if others_ready and not overlap else self.executor
        assert executor is not None
        slot.loading = asyncio.create_task(self.load(slot, executor), name=f"load-{slot.name}")

    def shares_weights(self, slot: ModelSlot) -> bool:
        """True when a block of ``slot``'s weights is in memory for another model (a shared base:
        attaching to it while that model captions would change it under its feet)."""
        keys = set(slot.memory_parts())
        return any(
            keys & set(other.memory_parts())
            for other in self.slots.values()
            if other is not slot and other.state in RESIDENT
        )

    async def load(self, slot: ModelSlot, executor: Executor) -> bool:
        """Bring ``slot`` to ready; on failure its waiting jobs get 503 and it is retried on the next."""
        try:
            if slot.state is ModelState.OFFLOADED and await self.wake(slot, executor):
                return True
            return await self.load_from_disk(slot, executor)
        finally:
            self.wakeup.set()

    async def load_from_disk(self, slot: ModelSlot, executor: Executor) -> bool:
        self.set_state(slot, ModelState.LOADING)
        started = time.monotonic()
        try:
            info = await asyncio.get_running_loop().run_in_executor(executor, slot.captioner.load)
        except Exception as exc:  # load errors are reported, never fatal
            message = exc.message if isinstance(exc, VisionServerError) else f"{type(exc).__name__}: {exc}"
            slot.last_error = without_local_path(message, slot.source, slot.name)
            expected = isinstance(exc, VisionServerError)
            if self.log_load_failures or not expected:
                log.error(
                    "model %s failed to load: %s",
                    slot.name,
                    message,
                    exc_info=not expected,
                    extra=model_key(slot),
                )
            self.set_state(slot, ModelState.FAILED)
            self.observer.model_loaded(slot.name, time.monotonic() - started, ok=False)
            error = self.load_error_message(slot)
            for job in slot.queue.take_all():
                fail(job, ModelLoadError(error, retry_after=LOAD_RETRY_AFTER))
            return False
        seconds = time.monotonic() - started
        slot.info = info
        slot.last_error = None
        slot.loaded_since = time.time()
        slot.last_finished = self.clock.now()
        self.set_state(slot, ModelState.READY)
        self.observer.model_loaded(slot.name, seconds, ok=True)
        log.info(
            "model %s loaded on %s (%s) in %.2f s",
            slot.name,
            info.device,
            info.dtype,
            seconds,
            extra=model_key(slot),
        )
        return True

    def tier_available(self, slot: ModelSlot) -> bool:
        """Whether an idle model goes to host memory first: the tier is on and helps this device."""
        captioner = slot.captioner
        return self.offload_timeout > 0 and isinstance(captioner, Offloadable) and captioner.can_offload

    async def step_down(self, slot: ModelSlot) -> None:
        """The idle timeout (or a keep-alive) ran out: ready → offloaded → unloaded, one step."""
        if slot.state is ModelState.READY and self.tier_available(slot):
            await self.offload(slot, "idle")
        else:
            await self.unload(slot, "idle")

    async def offload(self, slot: ModelSlot, reason: str) -> None:
        """Move the weights to host memory; a failure frees them instead (never a broken model)."""
        captioner = slot.captioner
        assert isinstance(captioner, Offloadable)
        slot.trim_pending = False
        started = time.monotonic()
        try:
            await self.in_model_thread(captioner.offload)
        except Exception:
            log.exception(
                "moving model %s to host memory failed; unloading it instead",
                slot.name,
                extra=model_key(slot),
            )
            await self.unload(slot, reason)
            return
        slot.offloaded_at = self.clock.now()
        slot.keep_alive = None  # a keep-alive lasts until the model steps down
        self.set_state(slot, ModelState.OFFLOADED)
        seconds = time.monotonic() - started
        self.observer.model_offloaded(slot.name, seconds, reason)
        log.info(
            "model moved to host memory (%s) in %.2f s; freed after %g s more: %s",
            reason,
            seconds,
            self.offload_timeout,
            slot.name,
            extra=model_key(slot),
        )

    async def wake(self, slot: ModelSlot, executor: Executor) -> bool:
        """Move offloaded weights back; False (model unloaded, load it anew) when that fails."""
        captioner = slot.captioner
        assert isinstance(captioner, Offloadable)
        self.set_state(slot, ModelState.LOADING)
        started = time.monotonic()
        try:
            slot.info = await asyncio.get_running_loop().run_in_executor(executor, captioner.restore)
        except Exception:
            log.exception(
                "moving model %s back from host memory failed; loading it from disk",
                slot.name,
                extra=model_key(slot),
            )
            self.set_state(slot, ModelState.READY)  # so that _unload drops what is left
            await self.unload(slot, "wake_failed")
            return False
        seconds = time.monotonic() - started
        slot.offloaded_at = None
        slot.last_finished = self.clock.now()
        self.set_state(slot, ModelState.READY)
        self.observer.model_woke(slot.name, seconds)
        log.info(
            "model woke from host memory in %.2f s (a load from disk would take longer): %s",
            seconds,
            slot.name,
            extra=model_key(slot),
        )
        return True

    async def unload(self, slot: ModelSlot, reason: str) -> None:
        if slot.state not in (ModelState.READY, ModelState.OFFLOADED):
            if slot.state is ModelState.FAILED:
                self.set_state(slot, ModelState.UNLOADED)
            return
        self.set_state(slot, ModelState.UNLOADING)
        slot.trim_pending = False  # unloading returns the memory itself
        started = time.monotonic()
        try:
            await self.in_model_thread(slot.captioner.unload)
        except Exception:
            log.exception(
                "unloading model %s raised; references were dropped anyway", slot.name, extra=model_key(slot)
            )
        slot.info = None
        slot.loaded_since = None
        slot.keep_alive = None  # a request's keep-alive lasts until the unload; the next load starts afresh
        slot.offloaded_at = None
        self.set_state(slot, ModelState.UNLOADED)
        seconds = time.monotonic() - started
        self.observer.model_unloaded(slot.name, seconds, reason)
        log.info("model unloaded (%s) in %.2f s: %s", reason, seconds, slot.name, extra=model_key(slot))

    def set_state(self, slot: ModelSlot, state: ModelState) -> None:
        if state is not slot.state:
            slot.loading_since = self.clock.now() if state is ModelState.LOADING else None
        slot.state = state
        if slot.default:
            self.observer.state_changed(state)

    @staticmethod
    def load_error_message(slot: ModelSlot) -> str:
        return f"The model could not be loaded: {slot.last_error}"

    async def in_model_thread(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, func, *args)

    async def trim_memory(self, slot: ModelSlot) -> None:
        """Hand freed memory back once the queue has stayed empty a while after a burst."""
        slot.trim_pending = False
        started = time.monotonic()
        try:
            await self.in_model_thread(slot.captioner.trim_memory)
        except Exception:  # never fatal: the memory is merely kept
            log.exception("trimming freed memory failed")
            return
        log.debug("returned freed memory to the OS in %.3f s", time.monotonic() - started)

    async def finish_load(self, slot: ModelSlot) -> None:
        """Wait for a load of ``slot`` in progress (an unload must not race it)."""
        if slot.loading is not None:
            await asyncio.gather(slot.loading, return_exceptions=True)
