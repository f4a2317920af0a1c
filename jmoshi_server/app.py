"""The aiohttp application: routes, health, status, static page, model lifecycle.

The model loads in the background after the socket is bound, so ``/healthz`` answers at
once and ``/readyz`` says what is happening during a long first download.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from . import __version__, metrics, recordings, security
from .checkpoint import CheckpointError, load_model
from .config import Config
from .engine import Engine
from .protocol import ErrorCode, Sampling
from .runtime import CpuSplit
from .session import handle_chat, refuse_chat, shut_down_socket
from .threads import in_daemon_thread

log = logging.getLogger(__name__)

mimetypes.add_type("application/wasm", ".wasm")


def bundled_static_dir() -> Path:
    """The page: inside the package when installed from a wheel, else the repo's static/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "static", here.parent / "static"):
        if (candidate / "index.html").is_file():
            return candidate
    return here.parent / "static"


@dataclass
class ServerState:
    """Everything the handlers share; one per app."""

    config: Config
    engine: Engine | None = None
    phase: str = "loading"  # loading -> ready | failed
    failure: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    loader: asyncio.Task | None = None
    cpu_split: CpuSplit | None = None  # set by the CLI, which pinned the loop's thread

    @property
    def ready(self) -> bool:
        engine = self.engine
        return engine is not None and engine.ready.is_set() and not engine.failure

    @property
    def problem(self) -> str | None:
        """Why the server cannot serve: a load failure, or a model that broke after it was ready."""
        return self.failure or (self.engine.failure if self.engine is not None else None)

    @property
    def current_phase(self) -> str:
        """``phase``, except "failed" once the model broke after it was ready."""
        return "failed" if self.problem else self.phase


STATE = web.AppKey("state", ServerState)
STATIC_DIR = web.AppKey("static_dir", Path)


async def load_engine(state: ServerState) -> None:
    """Load the checkpoint off the loop, then start the model thread (which warms up)."""
    config = state.config
    try:
        model = await in_daemon_thread(load_model, config, name="jmoshi-load")
    except CheckpointError as exc:
        state.phase, state.failure = "failed", str(exc)
        raise
    engine = Engine(
        model,
        Sampling.defaults(config),
        config.warmup_frames,
        step_delay_ms=config.bench_step_delay_ms,
        torch_threads=config.torch_threads,
        cpus=state.cpu_split.model if state.cpu_split else None,
        freeze_gc=config.gc_freeze,
    )
    engine.start()
    state.engine = engine
    state.phase = "warming_up"
    while not engine.ready.is_set() and not engine.failure:
        await asyncio.sleep(0.05)
    if engine.failure:
        state.phase, state.failure = "failed", engine.failure
        raise CheckpointError(engine.failure)
    state.phase = "ready"
    log.info("ready: %s on %s", model.source, model.device)


async def _engine_ctx(app: web.Application):
    state = app[STATE]
    state.loader = asyncio.create_task(load_engine(state))
    yield
    state.loader.cancel()
    if state.engine is not None:
        await asyncio.to_thread(state.engine.stop)


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, end each chat the normal way: the user is told (0x05 shutting_down), its
    recording is finished and the model freed; every step is bounded (see session.py)."""
    await asyncio.gather(*(shut_down_socket(ws) for ws in list(app[STATE].sockets)))


# ---- handlers --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"ready": True})
    phase = state.current_phase
    reason = state.problem or {
        "loading": "loading the model (the first start downloads it)",
        "warming_up": "warming up the model",
    }.get(phase, phase)
    return web.json_response({"ready": False, "phase": phase, "reason": reason}, status=503)


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


async def api_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    body: dict = {
        "version": __version__,
        "phase": state.current_phase,
        "ready": state.ready,
        "uptime_seconds": round(time.monotonic() - state.started_at, 1),
        "model": None,
    }
    if state.problem:
        body["failure"] = state.problem
    if engine is not None:
        model = engine.model
        current = engine.current
        steps = list(engine.stats.recent_steps)
        body.update(
            {
                "model": model.source,
                "device": str(model.device),
                "dtype": str(model.dtype).removeprefix("torch."),
                "busy": current is not None,
                "current_session_seconds": round(current.age_seconds, 1) if current else None,
                "sessions_served": engine.stats.sessions_served,
                "frames_processed": engine.stats.frames_processed,
                "frames_dropped": engine.stats.frames_dropped + (current.dropped_frames if current else 0),
                "step_ms_p50": {
                    "encode": _p50([s.encode for s in steps]),
                    "lm": _p50([s.lm for s in steps]),
                    "decode": _p50([s.decode for s in steps]),
                    "total": _p50([s.total for s in steps]),
                },
            }
        )
    return web.json_response(body)


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.ready:
        reason = state.problem or "the model is still loading; try again shortly"
        return await refuse_chat(request, state.config, ErrorCode.NOT_READY, reason)
    assert state.engine is not None
    return await handle_chat(request, state.engine, state.config, state.sockets)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(request.app[STATIC_DIR] / "index.html")


def create_app(config: Config, cpu_split: CpuSplit | None = None) -> web.Application:
    """The whole server; ``cpu_split`` when the caller pinned the loop (runtime.py)."""
    app = web.Application()
    app[STATE] = ServerState(config, cpu_split=cpu_split)
    static_dir = config.static_dir or bundled_static_dir()
    app[STATIC_DIR] = static_dir
    metrics.install(app, app[STATE])  # /metrics, before the static catch-all at /
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/chat", chat)
    security.setup(app, config)
    app.router.add_get("/", index)
    recordings.setup(app, config)  # before the static catch-all
    app.router.add_static("/", static_dir)
    app.cleanup_ctx.append(_engine_ctx)
    app.on_shutdown.append(_close_sockets)
    return app
