"""Prometheus metrics, one registry per application so tests (and embedders) can build many apps.

Names follow the Prometheus conventions: one ``vision_server_`` prefix, base units (seconds,
bytes), ``_total`` on counters, low-cardinality labels only (a route *name*, never a path or a
request id). Gauges that describe the engine are read from it at scrape time, so they cannot drift.
Everything one model does (queue wait, batches, loads, unloads) carries a ``model`` label, shown as
:func:`~vision_server.model_specs.public_labels` shows it, so a server with several models tells
which one is slow; ``sum without (model)`` gives the server's totals.
Histogram buckets reach 10 minutes: a cold load plus a long caption takes seconds, not the
milliseconds the client library's default buckets are made for.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vision_server import __version__
from vision_server.engine.lifecycle import EngineStatus, ModelState
from vision_server.engine.observer import EngineObserver
from vision_server.gpu import gpu_memory
from vision_server.model_specs import public_labels

if TYPE_CHECKING:
    from vision_server.engine.scheduler import Engine

PREFIX = "vision_server_"
SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_SECONDS = (0.001, 0.005, 0.01, 0.025, *SECONDS)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
LOAD_OUTCOMES = ("ok", "failed")
UNLOAD_REASONS = ("idle", "admin", "shutdown", "evicted", "wake_failed")
OFFLOAD_REASONS = ("idle", "admin")
REJECT_REASONS = (
    "queue_full",
    "draining",
    "timeout",
    "client_disconnected",
    "worker_unavailable",
    "unauthorized",
    "forbidden",
    "rate_limited",
)


class Metrics(EngineObserver):
    """Every metric of one server; also the engine's observer, so engine events feed it directly."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time to answer an HTTP request, by route name and status code.",
            ["route", "status"],
            buckets=SECONDS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time a job waited in the queue before its batch started (includes a cold load), by model.",
            ["model"],
            buckets=QUEUE_SECONDS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            PREFIX + "inference_duration_seconds",
            "Time of one generate call for a whole batch, by model.",
            ["model"],
            buckets=SECONDS,
            registry=registry,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Images captioned together in one generate call, by model.",
            ["model"],
            buckets=BATCH_SIZES,
            registry=registry,
        )
        self.loads = Counter(
            PREFIX + "model_loads",
            "Model load attempts, by model and outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.load_duration = Histogram(
            PREFIX + "model_load_duration_seconds",
            "Time of a model load attempt, by model and outcome.",
            ["model", "outcome"],
            buckets=SECONDS,
            registry=registry,
        )
        self.unloads = Counter(
            PREFIX + "model_unloads",
            "Model unloads, by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.unload_duration = Histogram(
            PREFIX + "model_unload_duration_seconds",
            "Time to unload a model and give its memory back, by model.",
            ["model"],
            buckets=SECONDS,
            registry=registry,
        )
        self.offloads = Counter(
            PREFIX + "model_offloads",
            "Moves of a model to host memory (the warm tier), by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.wake_duration = Histogram(
            PREFIX + "model_wake_duration_seconds",
            "Time to move a model back from host memory to the device, by model.",
            ["model"],
            buckets=SECONDS,
            registry=registry,
        )
        self.rejected = Counter(
            PREFIX + "requests_rejected",
            "Requests or jobs refused (queue full, draining, worker down, auth, forbidden, rate limit), "
            "timed out, or dropped when their client hung up; by reason.",
            ["reason"],
            registry=registry,
        )
        ProcessCollector(registry=registry)
        self._labels: dict[str, str] = {}  # served name -> its model label, set by watch()
        # Zero-valued series exist from the start, so rate() and alerts work before the first event
        # (the per-model ones once watch() knows the models).
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def watch(self, engine: Engine) -> None:
        """Report ``engine``'s models, queue, state and GPU memory at every scrape."""
        labels = public_labels(engine.model_names)
        self._labels = labels
        for model in labels.values():
            for histogram in (self.queue_wait, self.inference_duration, self.batch_size,
                              self.unload_duration, self.wake_duration):  # fmt: skip
                histogram.labels(model)
            for outcome in LOAD_OUTCOMES:
                self.loads.labels(model, outcome)
                self.load_duration.labels(model, outcome)
            for reason in UNLOAD_REASONS:
                self.unloads.labels(model, reason)
            for reason in OFFLOAD_REASONS:
                self.offloads.labels(model, reason)
        Info(PREFIX + "build", "Version of the server and its default model.", registry=self.registry).info(
            {
                "version": __version__,
                "model": labels[engine.default_model],
                "python": platform.python_version(),
            }
        )
        self.registry.register(EngineCollector(engine, labels))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # --- HTTP events ---------------------------------------------------------------------------

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        self.request_duration.labels(route, str(status)).observe(seconds)

    def request_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    # --- engine events (EngineObserver) ----------------------------------------------------------

    def _label(self, model: str) -> str:
        """``model``'s label; a name watch() did not see (an embedder's engine) is shown the same way."""
        return self._labels.get(model) or public_labels([model])[model]

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        label, outcome = self._label(model), "ok" if ok else "failed"
        self.loads.labels(label, outcome).inc()
        self.load_duration.labels(label, outcome).observe(seconds)

    def model_unloaded(self, model: str, seconds: float, reason: str) -> None:
        label = self._label(model)
        self.unloads.labels(label, reason).inc()
        self.unload_duration.labels(label).observe(seconds)

    def model_offloaded(self, model: str, seconds: float, reason: str) -> None:
        self.offloads.labels(self._label(model), reason).inc()

    def model_woke(self, model: str, seconds: float) -> None:
        self.wake_duration.labels(self._label(model)).observe(seconds)

    def batch_finished(self, model: str, size: int, seconds: float) -> None:
        label = self._label(model)
        self.batch_size.labels(label).observe(size)
        self.inference_duration.labels(label).observe(seconds)

    def job_started(self, model: str, queue_wait: float) -> None:
        self.queue_wait.labels(self._label(model)).observe(queue_wait)

    def job_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()


class EngineCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes, never cached."""

    def __init__(self, engine: Engine, labels: Mapping[str, str]) -> None:
        self.engine = engine
        self.labels = labels  # served name -> its ``model`` label (see public_labels)

    def collect(self) -> Iterator[Metric]:
        status = self.engine.status()
        yield GaugeMetricFamily(
            PREFIX + "queue_depth", "Jobs waiting in the queue.", value=status.queue_depth
        )
        lanes = GaugeMetricFamily(
            PREFIX + "lane_queue_depth", "Jobs waiting in each priority lane.", labels=["lane"]
        )
        for lane, depth in status.lane_depths.items():
            lanes.add_metric([lane], depth)
        yield lanes
        yield GaugeMetricFamily(
            PREFIX + "jobs_running", "Jobs in the batch being captioned now.", value=status.jobs_running
        )
        yield GaugeMetricFamily(
            PREFIX + "draining", "1 while shutting down (refusing new jobs).", value=int(status.draining)
        )
        yield CounterMetricFamily(
            PREFIX + "worker_restarts",
            "Times the captioning worker died and was restarted (a bug: the error log has why).",
            value=self.engine.worker_restarts,
        )
        state = GaugeMetricFamily(
            PREFIX + "model_state",
            "1 for the default model's current lifecycle state, 0 for the others.",
            labels=["state"],
        )
        for candidate in ModelState:
            state.add_metric([candidate.value], float(candidate is status.state))
        yield state
        yield from _model_families(status, self.labels)
        yield from _gpu_families()


def _model_families(status: EngineStatus, labels: Mapping[str, str]) -> Iterator[Metric]:
    """Every served model's state and weights, and the memory budget they share."""
    states = GaugeMetricFamily(
        PREFIX + "served_model_state",
        "1 for each served model's current lifecycle state, 0 for the others.",
        labels=["model", "state"],
    )
    memory = GaugeMetricFamily(
        PREFIX + "served_model_memory_bytes",
        "Bytes each served model's weights take (estimated until its first load).",
        labels=["model"],
    )
    # Which model the work waits for, and which one the worker runs now (the totals above add up
    # every model).
    queued = GaugeMetricFamily(
        PREFIX + "served_model_queue_depth", "Jobs waiting for each served model.", labels=["model"]
    )
    running = GaugeMetricFamily(
        PREFIX + "served_model_jobs_running",
        "Jobs in the batch each served model is captioning now.",
        labels=["model"],
    )
    for model in status.models:
        label = labels.get(model.name, model.name)
        for candidate in ModelState:
            states.add_metric([label, candidate.value], float(candidate is model.state))
        if model.memory_bytes is not None:  # None: not asked yet, just after start
            memory.add_metric([label], model.memory_bytes)
        queued.add_metric([label], model.queue_depth)
        running.add_metric([label], model.jobs_running)
    yield from (states, memory, queued, running)
    yield GaugeMetricFamily(
        PREFIX + "memory_used_bytes",
        "Bytes the loaded models' weights take together.",
        value=status.memory_used,
    )
    if status.memory_budget is not None:
        yield GaugeMetricFamily(
            PREFIX + "memory_budget_bytes",
            "The --memory-budget the loaded models share.",
            value=status.memory_budget,
        )


def _gpu_families() -> Iterator[Metric]:
    devices = gpu_memory()
    if not devices:
        return
    allocated = GaugeMetricFamily(
        PREFIX + "gpu_memory_allocated_bytes", "GPU memory held by live tensors.", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        PREFIX + "gpu_memory_reserved_bytes",
        "GPU memory held by torch's caching allocator (what other processes cannot use).",
        labels=["device"],
    )
    total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory size.", labels=["device"])
    for device in devices:
        allocated.add_metric([device.device], device.allocated)
        reserved.add_metric([device.device], device.reserved)
        if device.total is not None:
            total.add_metric([device.device], device.total)
    yield from (allocated, reserved, total)
