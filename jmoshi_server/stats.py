"""One session's live numbers: the stats message (kind 0x08) and its share of the metrics.

The session calls the meter on the event loop: once per input frame queued, once per model
result handled (after its audio was sent), and once at the end. Every second or so the meter
sends the page a small JSON summary of the last two seconds (docs/protocol-stats.md) so it
can show step times and say when the GPU is too slow for real time.

Server-added latency, per output frame: from the moment the input message that carried the
frame was received to the moment the answering audio was handed to the socket, minus the time
the model thread spent on the frame. That is the queue wait plus the thread hand-offs, the
Opus encode and the send: what the server adds around the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from . import protocol
from .engine import FRAME_SECONDS, FrameResult
from .metrics import NORMAL, STAGES, Metrics
from .protocol import Kind

FRAME_MS = FRAME_SECONDS * 1000
WINDOW_S = 2.0  # the stats message summarises this much recent time
_MAX_RECENT = 256  # bound on frames kept for the window (12.5 per second)


@dataclass(frozen=True)
class _Frame:
    """What the window keeps of one handled result (not its audio)."""

    at: float  # perf_counter when it was handled
    steps: tuple[float, float, float, float]  # encode, lm, decode, total (ms)
    added_ms: float | None  # server-added latency; None when no audio page went out


def _pct(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(value: float) -> float:
    return round(value, 2)


class SessionMeter:
    """Counts, the recent-frame window and the optional per-frame trace of one session."""

    def __init__(
        self,
        metrics: Metrics | None,
        trace: bool = False,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.metrics = metrics
        self.window_s = window_s
        self.clock = clock
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.started_at: float | None = None
        self._recent: collections.deque[_Frame] = collections.deque(maxlen=_MAX_RECENT)
        self.trace: list[dict] | None = [] if trace else None

    # ---- fed by the session ------------------------------------------------------------

    def started(self) -> None:
        self.started_at = self.clock()
        if self.metrics:
            self.metrics.active.inc()

    def queued(self, dropped: int) -> None:
        """One input frame was queued for the model; ``dropped`` older ones went for it."""
        self.frames_in += 1
        self.dropped += dropped
        if self.metrics:
            self.metrics.frames_in.inc()
            if dropped:
                self.metrics.frames_dropped.inc(dropped)

    def handled(self, result: FrameResult, sent_at: float | None) -> None:
        """A model result was handled; ``sent_at`` is when its audio went out (None: none did)."""
        t = result.timings
        steps = (t.encode, t.lm, t.decode, t.total)
        added = None
        if sent_at is not None and result.received_at is not None:
            model_s = result.finished_at - result.started_at
            added = max(0.0, sent_at - result.received_at - model_s) * 1000
        now = self.clock()
        self._recent.append(_Frame(now, steps, added))
        if result.pcm is not None:
            self.frames_out += 1
        if self.trace is not None:
            self.trace.append(
                {
                    "received": result.received_at,
                    "started": result.started_at,
                    "finished": result.finished_at,
                    "sent": sent_at,
                    "encode_ms": t.encode,
                    "lm_ms": t.lm,
                    "decode_ms": t.decode,
                }
            )
        metrics = self.metrics
        if metrics:
            for stage, ms in zip(STAGES, steps, strict=True):
                metrics.step_seconds.labels(stage).observe(ms / 1000)
            if result.pcm is not None:
                metrics.frames_out.inc()
            if added is not None:
                metrics.server_added.observe(added / 1000)

    def ended(self, reason: str | None, held_seconds: float | None) -> None:
        """The socket is closing; ``reason`` is the error code (None: a normal end)."""
        if self.metrics:
            self.metrics.session_ended(reason or NORMAL, held_seconds)
            if self.started_at is not None:
                self.metrics.active.dec()

    # ---- the stats message -------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict:
        """The stats message's JSON (docs/protocol-stats.md)."""
        now = self.clock() if now is None else now
        recent = [f for f in self._recent if now - f.at <= self.window_s]
        body: dict = {
            "session_seconds": round(now - self.started_at, 1) if self.started_at is not None else 0.0,
            "window_seconds": self.window_s,
            "frames": len(recent),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "dropped_frames": self.dropped,
            "frame_ms": FRAME_MS,
            "step_ms": None,
            "realtime_factor": None,
            "realtime": None,
            "server_added_ms": None,
        }
        if recent:
            columns = [sorted(f.steps[i] for f in recent) for i in range(len(STAGES))]
            body["step_ms"] = {
                f"p{q}": {stage: _ms(_pct(col, q)) for stage, col in zip(STAGES, columns, strict=True)}
                for q in (50, 95)
            }
            mean_total = sum(columns[3]) / len(recent)
            factor = mean_total / FRAME_MS
            body["realtime_factor"] = round(factor, 3)
            body["realtime"] = factor < 1.0
        added = sorted(f.added_ms for f in recent if f.added_ms is not None)
        if added:
            body["server_added_ms"] = {
                "p50": _ms(_pct(added, 50)),
                "p95": _ms(_pct(added, 95)),
                "max": _ms(added[-1]),
            }
        return body

    async def send_every(self, interval: float, send: Callable[[bytes], Awaitable[object]]) -> None:
        """Send the stats message every ``interval`` s until cancelled."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send(protocol.encode(Kind.STATS, json.dumps(self.snapshot()).encode("utf-8")))

    # ---- benchmarks ----------------------------------------------------------------------

    def write_trace(self, path: Path) -> None:
        """Per-frame stamps as JSON lines (``--bench-trace-dir``; bench/vs_moshi_server.py)."""
        if self.trace is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for record in self.trace:
                out.write(json.dumps(record) + "\n")
