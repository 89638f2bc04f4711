"""Hooks through which the engine reports what it does (metrics, logs) without knowing who listens.

Events about one model carry its served name first, so a listener serving several models can tell
them apart (a slow load or a small batch belongs to a model, not to the server)."""

from __future__ import annotations

from vision_server.engine.lifecycle import ModelState


class EngineObserver:
    """Receives engine events. The base class ignores them all; override what you need."""

    def state_changed(self, state: ModelState) -> None:
        """The model moved to ``state``."""

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        """A load attempt finished after ``seconds``."""

    def model_unloaded(self, model: str, seconds: float, reason: str) -> None:
        """The model was unloaded; reason is idle, admin or shutdown."""

    def model_offloaded(self, model: str, seconds: float, reason: str) -> None:
        """The weights moved to host memory (the warm tier) in ``seconds``; reason is idle or admin."""

    def model_woke(self, model: str, seconds: float) -> None:
        """Offloaded weights moved back to the device in ``seconds``."""

    def batch_finished(self, model: str, size: int, seconds: float) -> None:
        """A generate call for ``size`` jobs took ``seconds``."""

    def job_started(self, model: str, queue_wait: float) -> None:
        """A job left the queue after waiting ``queue_wait`` seconds."""

    def job_rejected(self, reason: str) -> None:
        """A job was refused (queue_full, draining) or dropped (disconnected, timeout)."""


class ObserverGroup(EngineObserver):
    """Forwards every event to several observers (metrics plus whatever a caller passes in)."""

    def __init__(self, *observers: EngineObserver) -> None:
        self.observers = observers

    def state_changed(self, state: ModelState) -> None:
        for observer in self.observers:
            observer.state_changed(state)

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        for observer in self.observers:
            observer.model_loaded(model, seconds, ok)

    def model_unloaded(self, model: str, seconds: float, reason: str) -> None:
        for observer in self.observers:
            observer.model_unloaded(model, seconds, reason)

    def model_offloaded(self, model: str, seconds: float, reason: str) -> None:
        for observer in self.observers:
            observer.model_offloaded(model, seconds, reason)

    def model_woke(self, model: str, seconds: float) -> None:
        for observer in self.observers:
            observer.model_woke(model, seconds)

    def batch_finished(self, model: str, size: int, seconds: float) -> None:
        for observer in self.observers:
            observer.batch_finished(model, size, seconds)

    def job_started(self, model: str, queue_wait: float) -> None:
        for observer in self.observers:
            observer.job_started(model, queue_wait)

    def job_rejected(self, reason: str) -> None:
        for observer in self.observers:
            observer.job_rejected(reason)
