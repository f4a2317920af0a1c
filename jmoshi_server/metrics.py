"""Prometheus metrics, all declared here, served at ``/metrics`` in the text format.

Each app gets its own ``CollectorRegistry`` (so tests can run several apps in one process).
What moves them:

- the session (on the event loop, via ``stats.SessionMeter``): frames in, out and dropped,
  per-frame step times, server-added latency, how each chat socket ended;
- a small task that sleeps 100 ms in a loop and records how late it woke (event-loop lag);
- a ``gc.callbacks`` hook that times each garbage collection (it holds the GIL, so it stalls
  the loop and the model alike; the hook is the one metric the model thread may touch);
- scrape-time reads: model ready, GPU memory (CUDA only).

Apart from the GC hook, the model thread does no metrics work: it stamps times on each
result, and the event loop observes them when the result arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .protocol import ErrorCode
from .runtime import GcPauseTimer

STAGES = ("encode", "lm", "decode", "total")
NORMAL = "normal"  # the session label for an ending without an error code

# Seconds. One frame is 80 ms: the step buckets are dense around it (1 ms .. 200 ms).
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2)
# The target for what the server adds around the model is 2 ms: fine buckets below 10 ms.
ADDED_BUCKETS = (0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
SESSION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
LOOP_LAG_INTERVAL_S = 0.1


class ServerView(Protocol):
    """What the scrape-time gauges read from the app's state (app.ServerState)."""

    @property
    def ready(self) -> bool: ...

    @property
    def engine(self): ...


class Metrics:
    """Every metric of one app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "jmoshi_step_seconds",
            "Model time per 80 ms frame by stage; total = encode + lm + decode (over 0.08 s: slower "
            "than real time)",
            ["stage"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.frames_in = Counter(
            "jmoshi_input_frames",
            "80 ms input frames decoded from clients and queued for the model",
            registry=r,
        )
        self.frames_dropped = Counter(
            "jmoshi_input_frames_dropped",
            "Queued input frames dropped because the model fell more than --input-budget-ms behind",
            registry=r,
        )
        self.frames_out = Counter("jmoshi_output_frames", "80 ms frames of model audio sent", registry=r)
        self.server_added = Histogram(
            "jmoshi_server_added_latency_seconds",
            "Per output frame: input message received -> output audio sent, minus the model step "
            "(queue wait, thread hand-offs, Opus encode, send)",
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.sessions = Counter(
            "jmoshi_sessions",
            "Chat sockets by how they ended: normal, or the error code (refusals such as busy, "
            "bad_parameter and not_ready included)",
            ["reason"],
            registry=r,
        )
        self.session_seconds = Histogram(
            "jmoshi_session_duration_seconds",
            "How long sessions held the model",
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self.active = Gauge("jmoshi_sessions_active", "Sessions holding the model (0 or 1)", registry=r)
        self.loop_lag = Histogram(
            "jmoshi_event_loop_lag_seconds",
            f"How late the event loop woke from a {LOOP_LAG_INTERVAL_S:g} s sleep",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "jmoshi_gc_pause_seconds",
            "Garbage collections by generation and how long each held the GIL (every thread waits)",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "jmoshi_model_ready", "1 when the model is loaded, warmed up and taking sessions", registry=r
        )
        # Every label shows from the start, at 0, so rates and alerts need no special case.
        for stage in STAGES:
            self.step_seconds.labels(stage)
        for reason in (NORMAL, *(str(code) for code in ErrorCode)):
            self.sessions.labels(reason)
        for generation in range(3):
            self.gc_pause.labels(str(generation))

    def watch(self, view: ServerView) -> None:
        """Scrape-time gauges that read the app's state."""
        self.model_ready.set_function(lambda: 1.0 if view.ready else 0.0)
        self.registry.register(_GpuMemory(view))

    def session_ended(self, reason: str, seconds: float | None) -> None:
        """A chat socket closed; ``seconds`` is how long it held the model (None: refused)."""
        self.sessions.labels(reason).inc()
        if seconds is not None:
            self.session_seconds.observe(seconds)


class _GpuMemory(Collector):
    """torch's CUDA allocator figures for the model's device, read at scrape time."""

    def __init__(self, view: ServerView) -> None:
        self.view = view

    def collect(self):
        engine = self.view.engine
        if engine is None or engine.model.device.type != "cuda":
            return
        device = engine.model.device
        for name, value, text in (
            ("allocated", torch.cuda.memory_allocated(device), "held by tensors"),
            ("reserved", torch.cuda.memory_reserved(device), "reserved by torch's caching allocator"),
            ("peak", torch.cuda.max_memory_allocated(device), "most ever held by tensors"),
        ):
            yield GaugeMetricFamily(f"jmoshi_gpu_memory_{name}_bytes", f"GPU memory {text}", value=value)


METRICS = web.AppKey("metrics", Metrics)


async def watch_loop_lag(metrics: Metrics, interval: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep ``interval`` again and again; record how late each wake-up was."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag.observe(max(0.0, loop.time() - start - interval))


async def _loop_lag_ctx(app: web.Application):
    task = asyncio.create_task(watch_loop_lag(app[METRICS]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _gc_timer_ctx(app: web.Application):
    histogram = app[METRICS].gc_pause
    with GcPauseTimer(lambda generation, seconds: histogram.labels(str(generation)).observe(seconds)):
        yield


async def metrics_handler(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def install(app: web.Application, view: ServerView) -> Metrics:
    """Give ``app`` its metrics, the ``/metrics`` route and the loop-lag task."""
    disable_created_metrics()  # no ``*_created`` series: they only add noise to every scrape
    metrics = Metrics()
    metrics.watch(view)
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_gc_timer_ctx)
    return metrics


def of(app: web.Application) -> Metrics | None:
    """The app's metrics, or None for an app built without them (some unit tests)."""
    return app.get(METRICS)
