"""One chat over one WebSocket: pumps audio from the socket into the engine and back.

socket -> Opus decode -> engine input queue -> (model thread) -> results -> Opus encode /
detokenize -> socket. The session never waits on the model: it only queues frames and
receives results the model thread hands to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from . import metrics, protocol, recordings
from .audio import BadAudio, OpusEncoder, OpusFrameDecoder
from .config import Config
from .engine import Engine, EngineSession, FrameResult, SessionEnd
from .protocol import ErrorCode, Kind, ParameterError, Sampling
from .sendlag import SendLag
from .stats import SessionMeter
from .text import Detokenizer

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)
READY_TIMEOUT_S = 120.0  # re-capturing CUDA graphs for new audio settings can take a while
ENGINE_RELEASE_TIMEOUT_S = 30.0  # one model step on a very slow device, with margin
MAX_PENDING_RESULTS = 25  # 2 s of model output waiting for a client that does not read
MAX_SEND_LAG_S = 5.0  # oldest byte the client has not acknowledged (see sendlag.py)
SEND_TIMEOUT_S = 3.0  # one send waiting for the socket to drain
CLOSE_TIMEOUT_S = 2.0  # the closing handshake; then the connection is cut
SHUTDOWN_MESSAGE = "the server is shutting down; try again in a moment"
SHUTDOWN_WAIT_S = 4.0  # on SIGTERM: a session's time to finish before its connection is cut


class ChatSocket(web.WebSocketResponse):
    """A WebSocketResponse that says *why* before aiohttp closes for an oversized message.

    aiohttp closes with 1009 inside ``receive()`` when a message passes ``max_msg_size``;
    this sends the protocol's ``message_too_large`` error first.
    """

    session: ChatSession | None = None  # the chat on this socket, for shutdown

    def __init__(self, **kwargs) -> None:
        # No permessage-deflate: Opus pages do not compress, so deflating them (and inflating
        # the client's) was CPU spent on the loop, on every frame's path, for nothing.
        super().__init__(compress=False, **kwargs)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send_bytes(
                    protocol.encode_error(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"a message was larger than the server's limit of {self._max_msg_size} bytes",
                    )
                )
            message = message or b"message too large"
        return await super().close(code=code, message=message, drain=drain)


class SessionLog(logging.LoggerAdapter):
    """Prefixes each line with the session's id and peer, e.g. ``[s3 192.168.1.20]``."""

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        super().__init__(logger, {})
        self.prefix = prefix

    def process(self, msg, kwargs):
        return f"[{self.prefix}] {msg}", kwargs


@dataclass
class Ending:
    """Why a session ended: an error code (None for a normal end) and the close code."""

    code: ErrorCode | None
    message: str
    close_code: int = WSCloseCode.OK


class ChatSession:
    def __init__(self, request: web.Request, ws: ChatSocket, engine: Engine, config: Config) -> None:
        self.id = next(_session_ids)
        self.ws = ws
        self.engine = engine
        self.config = config
        self.log = SessionLog(log, f"s{self.id} {request.remote or '?'}")
        self.detokenizer = Detokenizer(engine.model.tokenizer)
        self.decoder = OpusFrameDecoder()
        self.encoder = OpusEncoder()
        self.results: asyncio.Queue[FrameResult] = asyncio.Queue()
        self.engine_done = asyncio.Event()
        self.ending: Ending | None = None
        self.frames_out = 0
        self.last_audio = 0.0  # loop time of the last audio message (the handshake at first)
        self._warned: set[ErrorCode] = set()
        self.claim: EngineSession | None = None
        self.request = request
        self.recording = recordings.SessionRecording()
        self.send_lag = SendLag(request.transport)
        self._stop = asyncio.Event()  # set by shut_down()
        self.finished = asyncio.Event()
        self.meter = SessionMeter(metrics.of(request.app), trace=config.bench_trace_dir is not None)

    # ---- helpers -----------------------------------------------------------------------

    async def _send_error(self, code: ErrorCode, message: str, **extra: object) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(protocol.encode_error(code, message, **extra))

    async def _send(self, data: bytes) -> None:
        """Send one message; a client that does not read for too long is cut off."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the task's own
        # cancellation when the send completes at the same moment, and the sender then runs on
        # (waiting for results that never come) while the session waits for it to stop.
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await self.ws.send_bytes(data)
        except TimeoutError:
            self._slow_consumer(f"a send waited more than {SEND_TIMEOUT_S:.0f} s for the client")
            raise ConnectionResetError("the client stopped reading") from None
        self.send_lag.sent(len(data) + 4)
        if (lag := self.send_lag.seconds()) > MAX_SEND_LAG_S:
            self._slow_consumer(f"the client is {lag:.1f} s behind in reading")
            raise ConnectionResetError("the client stopped reading")

    def _slow_consumer(self, why: str) -> None:
        self._end(
            ErrorCode.SLOW_CONSUMER,
            f"the connection is not reading the model's audio fast enough ({why})",
            WSCloseCode.TRY_AGAIN_LATER,
        )
        if self.claim:
            self.claim.close()

    def shut_down(self) -> None:
        """Server shutdown: end the session the normal way (tell, finish recording, free)."""
        self._end(ErrorCode.SHUTTING_DOWN, SHUTDOWN_MESSAGE, WSCloseCode.GOING_AWAY)
        self._stop.set()

    async def refuse(self, code: ErrorCode, message: str, close_code: int, **extra: object) -> None:
        """Answer and close without ever taking the model."""
        self.log.info("refused (%s): %s", code, message)
        self.meter.ended(code, None)
        await _refuse(self.ws, code, message, close_code, **extra)

    def _end(self, code: ErrorCode | None, message: str, close_code: int = WSCloseCode.OK) -> None:
        """Record the first reason the session ends; later ones are consequences."""
        if self.ending is None:
            self.ending = Ending(code, message, close_code)

    def _on_result(self, item: FrameResult | SessionEnd) -> None:
        """Runs on the event loop for every item the model thread posts."""
        self.recording.on_result(item)  # what the model did, even if the client is too slow
        if isinstance(item, SessionEnd):
            if item.error:
                self._end(ErrorCode.INTERNAL, item.error, WSCloseCode.INTERNAL_ERROR)
            self.engine_done.set()
            self.results.put_nowait(None)  # wakes the sender so it can finish
            return
        if self.results.qsize() >= MAX_PENDING_RESULTS:
            self._slow_consumer(f"{MAX_PENDING_RESULTS} frames waiting to be sent")
            return
        self.results.put_nowait(item)

    # ---- the session -------------------------------------------------------------------

    async def run(self, query: dict[str, str]) -> None:
        try:
            sampling = protocol.parse_sampling(query, Sampling.defaults(self.config))
            record = recordings.wants_recording(query)
        except ParameterError as exc:
            await self.refuse(ErrorCode.BAD_PARAMETER, str(exc), WSCloseCode.POLICY_VIOLATION)
            return
        loop = asyncio.get_running_loop()
        self.claim = self.engine.try_claim(sampling, self.config.frame_budget, loop, self._on_result)
        if self.claim is None:
            current = self.engine.current
            age = round(current.age_seconds, 1) if current else 0.0
            await self.refuse(
                ErrorCode.BUSY,
                "another conversation is using the model; try again later",
                WSCloseCode.TRY_AGAIN_LATER,
                session_seconds=age,
            )
            return
        self.recording = recordings.SessionRecording.for_request(self.request, record)
        try:
            await self._converse()
        except ConnectionError as exc:  # the client left while we were talking to it
            self._end(None, f"connection lost: {exc}")
        finally:
            await self._finish()

    async def _converse(self) -> None:
        claim = self.claim
        assert claim is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            ready = await asyncio.shield(claim.ready)
        if not ready:
            self._end(
                ErrorCode.INTERNAL, "the model could not start this session", WSCloseCode.INTERNAL_ERROR
            )
            return
        if self._stop.is_set():
            return
        await self.recording.start(Detokenizer(self.engine.model.tokenizer), self._record_header(), self.log)
        await self._send(protocol.encode(Kind.HANDSHAKE))
        await self._send(protocol.encode_json(Kind.METADATA, self._metadata()))
        self.log.info("session started (seed %d, %s)", claim.seed, claim.sampling)
        self.last_audio = asyncio.get_running_loop().time()
        self.meter.started()
        # The session ends when the client stops, the sender stops, or the model thread is
        # done with it (an error, or a client too slow to read), whichever comes first.
        tasks = {
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self.engine_done.wait()),
            asyncio.create_task(self._stop.wait()),
        }
        if self.config.idle_seconds:
            tasks.add(asyncio.create_task(self._idle_watch()))
        if self.config.stats_interval_seconds > 0:
            tasks.add(
                asyncio.create_task(self.meter.send_every(self.config.stats_interval_seconds, self._send))
            )
        limit = self.config.max_session_seconds or None
        done, _ = await asyncio.wait(tasks, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            self._end(
                ErrorCode.SESSION_LIMIT,
                f"sessions are limited to {self.config.max_session_seconds} s; start a new one",
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _metadata(self) -> dict:
        claim = self.claim
        assert claim is not None
        model = self.engine.model
        return {
            "server": "jmoshi-server",
            "model": model.source,
            "device": str(model.device),
            "sampling": claim.sampling_in_force,
            "sample_rate": 24000,
            "frame_rate": 12.5,
            "max_session_seconds": self.config.max_session_seconds,
            "idle_seconds": self.config.idle_seconds,
            "input_budget_ms": self.config.input_budget_ms,
            **self.recording.metadata(),
        }

    def _record_header(self) -> dict:
        """What a recording's transcript says about the session it comes from."""
        claim = self.claim
        assert claim is not None
        return {
            "session": f"s{self.id}",
            "model": self.engine.model.source,
            "sampling": claim.sampling_in_force,
        }

    async def _finish(self) -> None:
        """Free the model before the socket closes, so the next user finds it free."""
        if self.claim is not None:
            self.claim.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ENGINE_RELEASE_TIMEOUT_S):
                    await self.engine_done.wait()
        ending = self.ending or Ending(None, "normal")
        await self.recording.finish(str(ending.code or "normal"), ending.message)
        if ending.code is not None and not self.ws.closed:
            await self._send_error(ending.code, ending.message)
        claim = self.claim
        self.log.info(
            "session ended after %.1f s (%s): %d frames in, %d out, %d dropped",
            claim.age_seconds if claim else 0.0,
            ending.code or "normal",
            claim.frames_in if claim else 0,
            self.frames_out,
            claim.dropped_frames if claim else 0,
        )
        if ending.code is not None:
            self.log.warning("%s: %s", ending.code, ending.message)
        self.meter.ended(ending.code, claim.age_seconds if claim else None)
        if self.config.bench_trace_dir is not None:
            await asyncio.to_thread(
                self.meter.write_trace, self.config.bench_trace_dir / f"session-{self.id}.jsonl"
            )
        await _bounded_close(self.ws, ending.close_code, str(ending.code or "bye").encode())
        self.finished.set()

    # ---- pumps -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for message in self.ws:
            if message.type == WSMsgType.BINARY:
                if not await self._on_binary(message.data):
                    return
            elif message.type == WSMsgType.TEXT:
                await self._complain(
                    ErrorCode.TEXT_FRAME, "text frames are not part of the protocol; send binary messages"
                )
            elif message.type == WSMsgType.ERROR:
                break
        error = self.ws.exception()
        if getattr(error, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
            # aiohttp closed the socket; ChatSocket.close already told the client why.
            limit = self.config.max_message_bytes
            self._end(
                ErrorCode.MESSAGE_TOO_LARGE, f"a message exceeded {limit} bytes", WSCloseCode.MESSAGE_TOO_BIG
            )
        elif error is not None:
            self._end(None, f"connection error: {error}")
        else:
            self._end(None, "client closed")

    async def _on_binary(self, data: bytes) -> bool:
        """Handle one binary message; False when it ends the session."""
        if not data:
            await self._complain(ErrorCode.EMPTY_MESSAGE, "empty message (no kind byte)")
            return True
        kind, payload = data[0], data[1:]
        if kind == Kind.AUDIO:
            self.last_audio = asyncio.get_running_loop().time()
            received_at = time.perf_counter()
            try:
                frames = self.decoder.feed(payload)
            except BadAudio as exc:
                self._end(ErrorCode.BAD_AUDIO, str(exc), WSCloseCode.UNSUPPORTED_DATA)
                return False
            for frame in frames:
                dropped = self.claim.push(frame, received_at)  # type: ignore[union-attr]
                self.recording.on_dropped(dropped)
                self.meter.queued(dropped)
            return True
        if kind in protocol.IGNORED_CLIENT_KINDS:
            return True
        await self._complain(ErrorCode.UNKNOWN_KIND, f"unknown message kind 0x{kind:02x}")
        return True

    async def _idle_watch(self) -> None:
        """End the session once no audio has arrived for --idle-seconds (a closed laptop lid,
        a phone that put the tab to sleep): the model is the one thing users wait for."""
        loop = asyncio.get_running_loop()
        limit = self.config.idle_seconds
        while (left := self.last_audio + limit - loop.time()) > 0:
            await asyncio.sleep(left)
        self._end(
            ErrorCode.IDLE_TIMEOUT,
            f"no audio arrived for {limit} s, so the session was ended to free the model; start a new one",
        )

    async def _complain(self, code: ErrorCode, message: str) -> None:
        """A recoverable protocol mistake: tell the client, log it once per session."""
        if code not in self._warned:
            self._warned.add(code)
            self.log.warning("%s: %s", code, message)
        await self._send_error(code, message)

    async def _send_loop(self) -> None:
        while (result := await self.results.get()) is not None:
            sent_at = None
            if result.pcm is not None:
                ogg = self.encoder.encode(result.pcm)
                self.frames_out += 1
                if ogg:
                    await self._send(protocol.encode(Kind.AUDIO, ogg))
                    sent_at = time.perf_counter()
            self.meter.handled(result, sent_at)
            if result.text_token is not None:
                text = self.detokenizer.push(result.text_token)
                if text:
                    await self._send(protocol.encode(Kind.TEXT, text.encode("utf-8")))
        self._end(None, "the model finished the session")


async def _refuse(
    ws: web.WebSocketResponse, code: ErrorCode, message: str, close_code: int, **extra: object
) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await ws.send_bytes(protocol.encode_error(code, message, **extra))
    await _bounded_close(ws, close_code, str(code).encode())


async def _bounded_close(ws: web.WebSocketResponse, code: int, message: bytes = b"") -> None:
    """The closing handshake, bounded: a client that does not answer (or does not read, so
    aiohttp's drain never returns) is cut off after CLOSE_TIMEOUT_S."""
    if ws.closed:
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close(code=code, message=message)
    except TimeoutError:
        _abort(ws)


def _abort(ws: web.WebSocketResponse) -> None:
    """Cut the TCP connection (no closing handshake): wakes everything waiting on it."""
    req = getattr(ws, "_req", None)  # the request the response was prepared for
    if req is not None and req.transport is not None:
        req.transport.abort()


async def shut_down_socket(ws: web.WebSocketResponse) -> None:
    """Server shutdown: end the chat on ``ws`` the normal way, or just say so and close."""
    session = getattr(ws, "session", None)
    if session is not None:
        session.shut_down()
        try:
            async with asyncio.timeout(SHUTDOWN_WAIT_S):
                await session.finished.wait()
        except TimeoutError:
            _abort(ws)  # its sends and close fail at once; a recording finishes in the background
        return
    await _refuse(ws, ErrorCode.SHUTTING_DOWN, SHUTDOWN_MESSAGE, WSCloseCode.GOING_AWAY)


async def refuse_chat(
    request: web.Request, config: Config, code: ErrorCode, message: str
) -> web.WebSocketResponse:
    """Open the socket only to say why there is no session (model loading or failed)."""
    ws = ChatSocket(max_msg_size=config.max_message_bytes)
    await ws.prepare(request)
    log.info("[%s] refused (%s): %s", request.remote, code, message)
    if (app_metrics := metrics.of(request.app)) is not None:
        app_metrics.session_ended(code, None)
    await _refuse(ws, code, message, WSCloseCode.TRY_AGAIN_LATER)
    return ws


async def handle_chat(
    request: web.Request, engine: Engine, config: Config, sockets: set[web.WebSocketResponse]
) -> web.WebSocketResponse:
    # autoclose off: the client's close is answered by _finish, after the model is free, so a
    # client that reconnects as soon as its close completes never finds the model busy.
    ws = ChatSocket(
        heartbeat=config.heartbeat_seconds, max_msg_size=config.max_message_bytes, autoclose=False
    )
    await ws.prepare(request)
    sockets.add(ws)
    session = ChatSession(request, ws, engine, config)
    ws.session = session
    try:
        await session.run(dict(request.query))
    except Exception:
        session.log.exception("session failed")
        raise
    finally:
        sockets.discard(ws)
        session.finished.set()
        await _bounded_close(ws, WSCloseCode.INTERNAL_ERROR)
    return ws
