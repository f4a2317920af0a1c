"""The model thread: one J-Moshi instance, one session at a time, one 80 ms frame per step.

Everything that touches the model (warm-up, per-session reset, every Mimi encode, LM step
and Mimi decode) runs on a single dedicated thread: the event loop never waits on the model,
and CUDA graphs moshi captures on the first calls are replayed on the thread that captured
them.

Data flows one way. The event loop pushes decoded 24 kHz PCM frames into a session's
bounded input queue (``EngineSession.push``); the thread steps the model and hands each
result back to the loop with ``call_soon_threadsafe``. When input arrives faster than the
model steps, the oldest queued frames beyond the budget are dropped and counted, so latency
stays bounded instead of growing without end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from moshi.models import LMGen
from moshi.utils import compile as compile_utils

from . import faults, runtime
from .checkpoint import LoadedModel
from .protocol import Sampling

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one Mimi frame
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
_POLL_SECONDS = 0.1  # how often an idle thread re-checks for a closed session


@dataclass(frozen=True)
class StepTimings:
    """Milliseconds spent in each stage of one frame."""

    encode: float
    lm: float
    decode: float

    @property
    def total(self) -> float:
        return self.encode + self.lm + self.decode


@dataclass(frozen=True)
class FrameResult:
    """The model's answer to one input frame. ``pcm`` is None while the LM warms its delays.

    ``pcm_in`` is the input frame the model consumed for this step (what recordings keep).
    The ``*_at`` stamps are ``time.perf_counter()`` values: when the input frame's message was
    received (as given to ``push``), when the model thread took the frame and when its step
    ended. They let the session measure what the server adds around the model (stats.py).
    """

    pcm: np.ndarray | None
    text_token: int | None
    timings: StepTimings
    pcm_in: np.ndarray | None = None
    received_at: float | None = None
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass(frozen=True)
class SessionEnd:
    """Posted once when the thread is done with a session; ``error`` when it failed."""

    error: str | None = None


class _StageClock:
    """Per-stage wall times; on CUDA, events so async kernels are charged to their stage."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        """Elapsed ms between consecutive marks (call after the last one, once synced)."""
        marks, self._marks = self._marks, []
        if self._cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]
        return [(b - a) * 1000 for a, b in itertools.pairwise(marks)]


@dataclass
class EngineSession:
    """One user's claim on the model, shared by the event loop and the model thread."""

    sampling: Sampling
    seed: int
    frame_budget: int
    loop: asyncio.AbstractEventLoop
    on_result: Callable[[FrameResult | SessionEnd], None]
    started_at: float = field(default_factory=time.monotonic)
    dropped_frames: int = 0
    frames_in: int = 0
    _inputs: collections.deque = field(default_factory=collections.deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False
    taken_received_at: float | None = None  # model thread: received_at of the frame it took last
    ready: asyncio.Future = field(init=False)

    def __post_init__(self) -> None:
        self.ready = self.loop.create_future()

    @property
    def sampling_in_force(self) -> dict:
        """The session's sampling settings with the seed actually used (metadata, recordings)."""
        return {**self.sampling.to_json(), "seed": self.seed}

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self.started_at

    def push(self, frame: np.ndarray, received_at: float | None = None) -> int:
        """Queue one 1920-sample frame; returns how many old frames were dropped for it.

        ``received_at`` (``time.perf_counter()``) comes back on the frame's FrameResult.
        """
        dropped = 0
        with self._cond:
            if self._closed:
                return 0
            self._inputs.append((frame, received_at))
            self.frames_in += 1
            while len(self._inputs) > self.frame_budget:
                self._inputs.popleft()
                dropped += 1
            self.dropped_frames += dropped
            self._cond.notify()
        return dropped

    def close(self) -> None:
        """No more input: the thread finishes the session and frees the model."""
        with self._cond:
            self._closed = True
            self._inputs.clear()
            self._cond.notify()

    def _next_frame(self) -> np.ndarray | None:
        """Model thread: the oldest queued frame (its ``received_at`` goes to ``taken_received_at``),
        or None once the session is closed."""
        with self._cond:
            while not self._inputs and not self._closed:
                self._cond.wait(_POLL_SECONDS)
            if self._closed:
                return None
            frame, self.taken_received_at = self._inputs.popleft()
            return frame

    def _post(self, item: FrameResult | SessionEnd) -> None:
        """Model thread: hand a result to the event loop."""
        self._call_on_loop(self.on_result, item)

    def _set_ready(self, ready: bool) -> None:
        """Model thread: tell the session whether it may start (first call wins)."""
        self._call_on_loop(_resolve, self.ready, ready)

    def _call_on_loop(self, fn: Callable, *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.loop.call_soon_threadsafe(fn, *args)


@dataclass
class EngineStats:
    sessions_served: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    recent_steps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=250))


class Engine:
    """Owns the model and its thread; sessions claim it one at a time."""

    def __init__(
        self,
        model: LoadedModel,
        default_sampling: Sampling,
        warmup_frames: int = 4,
        *,
        step_delay_ms: float = 0.0,
        torch_threads: int = 0,
        cpus: frozenset[int] | None = None,
        freeze_gc: bool = False,
    ) -> None:
        self.model = model
        self.default_sampling = default_sampling
        self.warmup_frames = warmup_frames
        # Benchmarks only (--bench-step-delay-ms): imitate an LM too slow for real time.
        self.step_delay_s = step_delay_ms / 1000
        self.cpus = cpus  # the model thread's CPUs (None: wherever the OS puts it)
        self.freeze_gc = freeze_gc  # runtime.freeze_garbage_collector once warm, before ready
        self.torch_threads = resolve_torch_threads(torch_threads, cpus)
        self.lm_gen = LMGen(
            model.lm,
            temp=default_sampling.audio_temperature,
            top_k=default_sampling.audio_topk,
            temp_text=default_sampling.text_temperature,
            top_k_text=default_sampling.text_topk,
        )
        self.stats = EngineStats()
        self.ready = threading.Event()
        self.failure: str | None = None  # why the model is unusable, once it is
        self._claim = threading.Lock()
        self._current: EngineSession | None = None
        self._pending: EngineSession | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._streaming = contextlib.ExitStack()
        self._graphed_audio_sampling: tuple[float, int] | None = None
        self._thread = threading.Thread(target=self._run, name="jmoshi-engine", daemon=True)
        self._faults = faults.from_env()  # test-only, see faults.py
        if self._faults is not None:
            log.warning("%s=%r: the model will fail on purpose (test-only)", faults.ENV, self._faults.spec)

    # ---- event-loop side -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        session = self._current
        if session is not None:
            session.close()
        self._thread.join(timeout)

    @property
    def current(self) -> EngineSession | None:
        return self._current

    def try_claim(
        self,
        sampling: Sampling,
        frame_budget: int,
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[FrameResult | SessionEnd], None],
    ) -> EngineSession | None:
        """The model for one session, or None at once when another session holds it."""
        if not self.ready.is_set() or self.failure or not self._claim.acquire(blocking=False):
            return None
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        session = EngineSession(sampling, seed, frame_budget, loop, on_result)
        with self._wake:
            self._current = session
            self._pending = session
            self._wake.notify()
        return session

    # ---- model thread ------------------------------------------------------------------

    def _run(self) -> None:
        # On the model thread itself: torch's threads inherit its CPU mask, and with OpenMP
        # the thread count is per calling thread.
        if self.cpus is not None:
            runtime.pin_this_thread(self.cpus)
        torch.set_num_threads(self.torch_threads)
        # On CPU moshi's small torch.compile fusions cost ~20 s of compiling at warm-up and
        # gain nothing measurable; on CUDA they stay on.
        on_cpu = self.model.device.type == "cpu"
        no_compile = compile_utils.no_compile() if on_cpu else contextlib.nullcontext()
        with torch.inference_mode(), no_compile:
            try:
                self._warm_up()
            except Exception as exc:
                self.failure = f"warm-up failed: {exc}"
                log.exception("warm-up failed; the server stays up but is not ready")
                return
            if self.freeze_gc:
                runtime.freeze_garbage_collector()
            self.ready.set()
            while True:
                with self._wake:
                    while self._pending is None and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    session, self._pending = self._pending, None
                self._serve(session)
        self._streaming.close()

    def _open_streaming(self, audio_sampling: tuple[float, int]) -> None:
        """(Re)enter moshi's streaming contexts with the LMGen's audio sampling fixed.

        On CUDA moshi graphs the depth transformer *with its sampling settings*, so a session
        that asks for other audio settings gets fresh streaming state and graphs; warm-up
        frames run so the capture happens before its handshake.
        """
        self._streaming.close()
        self.lm_gen.temp, self.lm_gen.top_k = audio_sampling
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(self.model.mimi.streaming(1))
        self._streaming.enter_context(self.lm_gen.streaming(1))
        self._graphed_audio_sampling = audio_sampling
        for _ in range(self.warmup_frames):
            self._step(np.zeros(FRAME_SAMPLES, dtype=np.float32))

    def _warm_up(self) -> None:
        started = time.monotonic()
        sampling = self.default_sampling
        self._open_streaming((sampling.audio_temperature, sampling.audio_topk))
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        log.info("warm-up done in %.1f s (%d frames)", time.monotonic() - started, self.warmup_frames)

    def _prepare(self, session: EngineSession) -> None:
        sampling = session.sampling
        audio = (sampling.audio_temperature, sampling.audio_topk)
        if self.model.device.type == "cuda" and audio != self._graphed_audio_sampling:
            log.info("audio sampling %s differs from the captured graphs: re-capturing", audio)
            self._open_streaming(audio)
        self.lm_gen.temp, self.lm_gen.top_k = audio
        self.lm_gen.temp_text = sampling.text_temperature
        self.lm_gen.top_k_text = sampling.text_topk
        self.model.mimi.reset_streaming()
        self.lm_gen.reset_streaming()
        torch.manual_seed(session.seed)

    def _serve(self, session: EngineSession) -> None:
        error = None
        try:
            self._prepare(session)
            session._set_ready(True)
            first = True
            while (frame := session._next_frame()) is not None:
                started_at = time.perf_counter()
                result = self._step(frame, discard_encoder_state=first)
                result = dataclasses.replace(
                    result,
                    received_at=session.taken_received_at,
                    started_at=started_at,
                    finished_at=time.perf_counter(),
                )
                first = False
                self.stats.frames_processed += 1
                self.stats.recent_steps.append(result.timings)
                session._post(result)
        except torch.cuda.OutOfMemoryError:
            error = "the GPU ran out of memory during this session"
            log.exception("CUDA out of memory in the model thread")
            torch.cuda.empty_cache()
        except Exception as exc:
            error = f"model error: {type(exc).__name__}: {exc}"
            log.exception("model thread failed during a session")
        finally:
            self.stats.sessions_served += 1
            self.stats.frames_dropped += session.dropped_frames
            session._set_ready(False)
            session._post(SessionEnd(error))
            if error is not None:
                self._recover(error)  # still holding the claim: nobody starts on a broken model
            with self._wake:
                self._current = None
            self._claim.release()

    def _recover(self, error: str) -> None:
        """After a failed session: fresh streaming state and a few frames as a self-test.

        If that fails too the model is unusable: ``failure`` is set, so ``/readyz`` answers 503
        with the reason and new sessions are refused with ``not_ready``.
        """
        audio = self._graphed_audio_sampling or (
            self.default_sampling.audio_temperature,
            self.default_sampling.audio_topk,
        )
        try:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
            self._open_streaming(audio)
        except Exception as exc:
            self.failure = (
                f"the model is unusable: after a failed session ({error}) "
                f"its self-test failed too ({type(exc).__name__}: {exc}); restart the server"
            )
            log.error("%s", self.failure, exc_info=True)
        else:
            log.info("model self-test after the failed session passed; ready for the next session")

    def _step(self, frame: np.ndarray, discard_encoder_state: bool = False) -> FrameResult:
        """One 80 ms frame: Mimi encode -> LM step -> Mimi decode."""
        if self._faults is not None and self.ready.is_set():
            self._faults.before_step()
        model = self.model
        clock = _StageClock(model.device)
        clock.mark()
        pcm_in = torch.from_numpy(frame).to(model.device)[None, None]
        codes = model.mimi.encode(pcm_in)
        if discard_encoder_state:
            # As moshi.server does: the first frame is in the model's past; its encoding is
            # left-padded, so the encoder state is reset to re-apply the padding next frame.
            model.mimi.reset_streaming()
        clock.mark()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        tokens = self.lm_gen.step(codes[:, :, :1])
        clock.mark()
        pcm_out = None
        text_token = None
        if tokens is not None:
            decoded = model.mimi.decode(tokens[:, 1:])
            clock.mark()
            pcm_out = decoded[0, 0].float().cpu().numpy()
            text_token = int(tokens[0, 0, 0].item())
        else:
            clock.mark()
        encode_ms, lm_ms, decode_ms = clock.spans_ms()
        return FrameResult(pcm_out, text_token, StepTimings(encode_ms, lm_ms, decode_ms), frame)


def resolve_torch_threads(requested: int = 0, cpus: frozenset[int] | None = None) -> int:
    """Torch CPU threads for the model: ``requested``; for 0 the model's CPUs when it has
    its own (runtime.py), else one fewer than the cores.

    On a 2-core machine torch's default (one thread per core) lets the model's OpenMP threads
    spin on the core the event loop and Opus need; bench/frame_loop.py --threads compares.
    """
    if requested > 0:
        return requested
    if cpus:
        return len(cpus)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)
