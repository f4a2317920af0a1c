"""Recordings: where they live, who can fetch them, how long they stay.

* A session asks with the query parameter ``record=1`` (off by default; ``--no-recording``
  turns the feature off). Its ``0x04`` metadata then carries ``recording_url``:
  ``/api/recordings/<token>`` with ``token = secrets.token_urlsafe(32)`` (256 random bits),
  sent only on that session's socket.
* The route serves the WAV once the session has ended (``?part=transcript``: the transcript
  as JSON). Before that, and for any unknown or malformed token: 404. There is no listing.
  It is a plain aiohttp route, so an access-token middleware covers it like every route.
* On disk, files are named after ``sha256(token)``, not the token: reading the directory
  (or a backup of it) does not yield working URLs.
* Start-up: unfinished recordings (a crash, ``kill -9``) are repaired before the server
  listens; then, and after every recording and every 10 minutes, recordings older than
  ``--recordings-keep-days`` go, then the oldest until all fit in ``--recordings-max-mb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from .config import Config
from .engine import FRAME_SECONDS, FrameResult, SessionEnd
from .protocol import ParameterError
from .recorder import (
    DISK,
    TRANSCRIPT_SUFFIX,
    WAV_SUFFIX,
    Recorder,
    RecordingFiles,
    read_transcript,
    repair,
)
from .text import Detokenizer

log = logging.getLogger(__name__)

ROUTE_PREFIX = "/api/recordings/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_STEM = re.compile(r"[0-9a-f]{64}")
PRUNE_INTERVAL_S = 600.0
START_WAIT_S = 5.0  # creating the files; a disk that does not answer means no recording
FINISH_WAIT_S = 5.0  # a session waits this long for its recording to close before closing anyway
SHUTDOWN_WAIT_S = 3.0  # at exit, for recordings still closing (a very slow disk)
_YES = {"1", "true", "yes", "on"}
_NO = {"0", "false", "no", "off", ""}
PRIVATE = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
}


def wants_recording(query: Mapping[str, str]) -> bool:
    """``record=1`` (or true/yes/on) asks for a recording; raises ParameterError on junk."""
    raw = query.get("record", "").strip().lower()
    if raw in _YES:
        return True
    if raw in _NO:
        return False
    raise ParameterError(f"record={query.get('record')!r} must be 1 or 0")


def stem_for(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class RecordingStore:
    """The recordings directory of one server. Only one server may use a directory."""

    def __init__(self, config: Config) -> None:
        self.directory: Path = config.resolved_recordings_dir
        self.enabled = config.recording
        self.keep_seconds = config.recordings_keep_days * 86400
        self.max_bytes = config.recordings_max_mb * 1024 * 1024
        self.active: set[str] = set()  # stems being written: not served, not pruned
        self._closing: set[asyncio.Task] = set()
        self._prune_lock = asyncio.Lock()

    def files(self, stem: str) -> RecordingFiles:
        return RecordingFiles.for_stem(self.directory, stem)

    # ---- sessions ------------------------------------------------------------------------

    async def start(self, detokenizer: Detokenizer, header: dict) -> tuple[str, Recorder]:
        token = secrets.token_urlsafe(32)
        stem = stem_for(token)
        self.active.add(stem)
        try:
            recorder = await Recorder.create(self.files(stem), detokenizer, header)
        except BaseException:
            self.active.discard(stem)
            raise
        return token, recorder

    def finish(self, recorder: Recorder, reason: str, message: str) -> asyncio.Task:
        """Close a recording in a task of the store's (so shutdown can wait for it)."""
        task = asyncio.create_task(self._finish(recorder, reason, message))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def _finish(self, recorder: Recorder, reason: str, message: str) -> None:
        try:
            await recorder.close(reason, message)
        finally:
            self.active.discard(recorder.files.wav.stem)
        log.info(
            "recording %s… finished: %.1f s", recorder.files.wav.stem[:8], recorder.frames * FRAME_SECONDS
        )
        await self.prune_now()

    async def wait_closing(self, timeout: float) -> None:
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=timeout)

    # ---- repair and retention ------------------------------------------------------------

    def _recordings(self) -> dict[str, tuple[float, int]]:
        """stem -> (newest mtime, total bytes) for the files this server wrote."""
        found: dict[str, tuple[float, int]] = {}
        if not self.directory.is_dir():
            return found
        with os.scandir(self.directory) as entries:
            for entry in entries:
                stem, _, ext = entry.name.partition(".")
                if not _STEM.fullmatch(stem) or "." + ext not in (WAV_SUFFIX, TRANSCRIPT_SUFFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    mtime, size = found.get(stem, (0.0, 0))
                    found[stem] = (max(mtime, st.st_mtime), size + st.st_size)
        return found

    def repair_all(self) -> list[str]:
        """Fix recordings a crash left unfinished (blocking; run before serving)."""
        repaired = []
        if self.directory.is_dir():
            for leftover in self.directory.glob("*.jsonl.tmp"):
                leftover.unlink(missing_ok=True)
        for stem in self._recordings():
            if stem in self.active:
                continue
            try:
                if repair(self.files(stem)):
                    repaired.append(stem)
            except OSError as exc:
                log.error("cannot repair recording %s…: %s", stem[:8], exc)
        if repaired:
            log.warning("repaired %d recording(s) left unfinished by a crash or kill", len(repaired))
        return repaired

    def prune(self, now: float | None = None) -> list[str]:
        """Delete what retention says must go (blocking). Returns the removed stems."""
        now = time.time() if now is None else now
        found = self._recordings()
        total = sum(size for _, size in found.values())
        removed = []
        for stem, (mtime, size) in sorted(found.items(), key=lambda item: item[1][0]):
            if stem in self.active:
                continue
            too_old = self.keep_seconds > 0 and now - mtime > self.keep_seconds
            too_big = self.max_bytes > 0 and total > self.max_bytes
            if not (too_old or too_big):
                continue
            files = self.files(stem)
            for path in (files.wav, files.transcript):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            total -= size
            removed.append(stem)
        if removed:
            log.info("retention removed %d recording(s)", len(removed))
        return removed

    async def prune_now(self) -> None:
        async with self._prune_lock:
            try:
                await DISK.run(self.prune)
            except OSError as exc:
                log.error("recordings retention failed: %s", exc)

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            await self.prune_now()

    # ---- HTTP ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        if not _TOKEN.fullmatch(token):
            raise web.HTTPNotFound(headers=PRIVATE)
        stem = stem_for(token)
        if stem in self.active:
            raise web.HTTPNotFound(headers=PRIVATE)
        files = self.files(stem)
        part = request.query.get("part", "audio")
        if part == "transcript":
            try:
                body = await DISK.run(read_transcript, files.transcript)
            except FileNotFoundError:
                raise web.HTTPNotFound(headers=PRIVATE) from None
            return web.json_response(body, headers=PRIVATE, dumps=_dumps)
        if part != "audio":
            raise web.HTTPBadRequest(text="part must be audio or transcript", headers=PRIVATE)
        if not await DISK.run(files.wav.is_file):
            raise web.HTTPNotFound(headers=PRIVATE)
        name = f"jmoshi-recording-{stem[:8]}.wav"
        headers = {**PRIVATE, "Content-Disposition": f'attachment; filename="{name}"'}
        return web.FileResponse(files.wav, headers=headers)


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


RECORDINGS = web.AppKey("recordings", RecordingStore)


async def _recordings_ctx(app: web.Application):
    store = app[RECORDINGS]
    try:
        await DISK.run(store.repair_all)
        await DISK.run(store.prune)
    except OSError as exc:
        log.error("recordings directory %s: %s", store.directory, exc)
    pruner = asyncio.create_task(store._prune_periodically())
    yield
    pruner.cancel()
    await store.wait_closing(SHUTDOWN_WAIT_S)


def setup(app: web.Application, config: Config) -> None:
    """Add the store, its route and its start-up/shutdown work (call before add_static)."""
    store = RecordingStore(config)
    app[RECORDINGS] = store
    app.router.add_get(ROUTE_PREFIX + "{token}", store.handle)
    app.cleanup_ctx.append(_recordings_ctx)


# ---- what a chat session uses --------------------------------------------------------------


class SessionRecording:
    """A session's recording, or the lack of one; every method is safe either way."""

    def __init__(self, store: RecordingStore | None = None, wanted: bool = False) -> None:
        self.store = store
        self.wanted = wanted
        self.recorder: Recorder | None = None
        self.url: str | None = None
        self.error: str | None = None

    @classmethod
    def for_request(cls, request: web.Request, wanted: bool) -> SessionRecording:
        return cls(request.app.get(RECORDINGS), wanted)

    async def start(self, detokenizer: Detokenizer, header: dict, session_log: logging.LoggerAdapter) -> None:
        if not self.wanted:
            return
        store = self.store
        if store is None or not store.enabled:
            self.error = "recording is turned off on this server"
            return
        try:
            token, self.recorder = await asyncio.wait_for(store.start(detokenizer, header), START_WAIT_S)
        except (OSError, TimeoutError) as exc:
            self.error = "the server cannot record right now"
            why = exc if isinstance(exc, OSError) else f"the disk did not answer in {START_WAIT_S:.0f} s"
            session_log.error("cannot start a recording in %s: %s", store.directory, why)
            return
        self.url = ROUTE_PREFIX + token
        session_log.info("recording to %s…", self.recorder.files.wav.stem[:8])

    def metadata(self) -> dict:
        if self.url:
            return {"recording": True, "recording_url": self.url}
        if self.wanted:
            return {"recording": False, "recording_error": self.error}
        return {"recording": False}

    def on_result(self, item: FrameResult | SessionEnd) -> None:
        if self.recorder is not None and isinstance(item, FrameResult):
            self.recorder.add(item)

    def on_dropped(self, count: int) -> None:
        if self.recorder is not None and count:
            self.recorder.add_dropped(count)

    async def finish(self, reason: str, message: str) -> None:
        """Finalise (bounded wait: on a very slow disk it completes in the background)."""
        recorder, self.recorder = self.recorder, None
        if recorder is None or self.store is None:
            return
        task = self.store.finish(recorder, reason, message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), FINISH_WAIT_S)
