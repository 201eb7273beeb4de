"""Prometheus metrics: requests, latency by stage, batching, queues and the model lifecycle.

One registry per app (tests build many apps in one process). Gauges that
describe current state (queue depth, model info, GPU memory) are read at
scrape time from the registry rather than kept in sync by hand. With several
HTTP processes (``MODSERVE_WORKERS``) every process writes its counts to files
(prometheus-client's multiprocess mode, set up by the supervisor) and a scrape
of any HTTP process sums them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.registry import ModelEvent, ModelRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("modserve_queue_depth", "Items waiting in a model's batch queue", labels=["model"])
        info = GaugeMetricFamily(
            "modserve_model_info", "The model version serving now (value 1)",
            labels=["name", "version", "sha256", "device", "dtype"],
        )
        ready = GaugeMetricFamily("modserve_model_ready", "1 when the model serves", labels=["model"])
        for view in self.registry.views() if self.registry else []:
            ready.add_metric([view.name], 1.0 if view.ready else 0.0)
            rt = view.runtime
            if rt is None:
                continue
            depth.add_metric([view.name], view.queue_depth)
            info.add_metric([rt.name, rt.version, rt.sha256[:12], str(rt.device), rt.dtype_name], 1.0)
        yield from (depth, info, ready)
        # an HTTP process reads the device process's figures from its snapshot, never its own CUDA
        gpu = getattr(self.registry, "gpu", None)
        yield from _gpu_memory(_local_gpu_memory() if gpu is None else gpu)


def _local_gpu_memory() -> list[tuple[str, int, int]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [(f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
            for i in range(torch.cuda.device_count())]


def _gpu_memory(figures: list[tuple[str, int, int]]) -> Iterator[Metric]:
    if not figures:
        return
    allocated = GaugeMetricFamily("modserve_gpu_memory_allocated_bytes", "torch allocated memory", labels=["device"])
    reserved = GaugeMetricFamily("modserve_gpu_memory_reserved_bytes", "torch reserved memory", labels=["device"])
    for device, used, held in figures:
        allocated.add_metric([device], used)
        reserved.add_metric([device], held)
    yield from (allocated, reserved)


class Metrics:
    def __init__(self, *, aggregate: bool = False) -> None:
        self.aggregate = aggregate
        """Render every process's counts (multiprocess mode) instead of this process's own."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modserve_requests_total", "HTTP requests by model, endpoint family and status code",
            ["model", "family", "code"], registry=r,
        )
        self.latency = Histogram(
            "modserve_request_duration_seconds", "Latency by stage: queue, preprocess, inference, total",
            ["model", "family", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "modserve_batch_size", "Items per forward", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.loads = Counter(
            "modserve_model_loads_total",
            "Model loads and reloads by result: success, failure, or fallback (the newest version failed and an"
            " older one serves)", ["model", "result"], registry=r,
        )
        self.load_duration = Histogram(
            "modserve_model_load_duration_seconds", "Time to build, load, smoke-test and warm a model", ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self._state = _StateCollector()
        r.register(self._state)

    def attach(self, registry: ModelRegistry) -> None:
        """Read the registry's state at scrape time and count its events."""
        self._state.registry = registry
        registry.subscribe(self.on_event)

    def on_event(self, event: ModelEvent) -> None:
        if event.kind == "batch" and event.size is not None:
            self.batch_size.labels(event.model).observe(event.size)
        elif event.kind in ("loaded", "swapped"):
            self.observe_load(event.model, True, event.seconds)
        elif event.kind == "failed":
            self.observe_load(event.model, False, None)
        elif event.kind == "fallback":
            self.loads.labels(event.model, "fallback").inc()

    def observe_stages(self, model: str, family: str, **seconds: float) -> None:
        for stage, value in seconds.items():
            self.latency.labels(model, family, stage).observe(value)

    def observe_load(self, model: str, ok: bool, seconds: float | None) -> None:
        self.loads.labels(model, "success" if ok else "failure").inc()
        if ok and seconds is not None:
            self.load_duration.labels(model).observe(seconds)

    def render(self) -> bytes:
        if not self.aggregate:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        MultiProcessCollector(every)
        every.register(self._state)
        return generate_latest(every)
