"""One session's recording on disk: a stereo WAV and a JSONL transcript, crash-safe.

Timeline: one 80 ms slot per frame the model processed. Slot k holds, on the left, the
input frame the model consumed at step k and, on the right, the audio it produced at that
step (silence while the LM still fills its acoustic delay: the first step with Moshi 7B).
So the file is the conversation *as the model heard and spoke it*: input dropped because
the model fell behind is not in it (the transcript says where), and the model's reply sits
where it was produced, with the same lag the user heard.

Crash safety: frames are buffered on the event loop (appending to a list, nothing else)
and written every ``FLUSH_SECONDS`` by the disk thread (``DISK``, never the model's), which also
rewrites the WAV header's two sizes to the data written so far and fsyncs both files. A
``kill -9`` therefore loses at most ``FLUSH_SECONDS`` plus one write; ``repair`` (run at
start-up) fixes the header from the file's length and closes the transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE, FrameResult
from .text import Detokenizer
from .threads import DaemonWorker

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHANNELS = 2  # left: the user as the model heard them; right: the model
SAMPLE_BYTES = 2  # PCM 16-bit
BLOCK_ALIGN = CHANNELS * SAMPLE_BYTES
HEADER_BYTES = 44
FLUSH_SECONDS = 0.5
MAX_BACKLOG_FRAMES = round(30 / FRAME_SECONDS)  # 30 s not yet on disk: the disk is too slow
WAV_SUFFIX = ".wav"
TRANSCRIPT_SUFFIX = ".jsonl"
DISK = DaemonWorker("jmoshi-disk")  # every recording write, in order, off the loop and the model
ALIGNMENT = (
    "one 80 ms slot per model step: left = the input frame the model consumed at that step, "
    "right = the audio it produced at that step (silence while its acoustic delay fills); "
    "input the model dropped because it fell behind is not in the file"
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def wav_header(data_bytes: int) -> bytes:
    """A canonical 44-byte PCM WAV header for ``data_bytes`` of stereo 16-bit 24 kHz audio."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        CHANNELS,
        SAMPLE_RATE,
        SAMPLE_RATE * BLOCK_ALIGN,
        BLOCK_ALIGN,
        SAMPLE_BYTES * 8,
        b"data",
        data_bytes,
    )


def interleave(frames: list[tuple[np.ndarray, np.ndarray | None]]) -> bytes:
    """(input, output) float frames -> interleaved stereo int16 bytes; None output is silence."""
    stereo = np.zeros((len(frames) * FRAME_SAMPLES, CHANNELS), dtype=np.float32)
    for i, (left, right) in enumerate(frames):
        rows = slice(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES)
        stereo[rows, 0] = left[:FRAME_SAMPLES]
        if right is not None:
            stereo[rows, 1] = right[:FRAME_SAMPLES]
    np.nan_to_num(stereo, copy=False)
    return (np.clip(stereo, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class WavWriter:
    """Appends stereo PCM to a WAV whose header always matches what was synced."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._file.write(wav_header(0))
        self.data_bytes = 0

    def append(self, pcm: bytes) -> None:
        self._file.write(pcm)
        self.data_bytes += len(pcm)

    def sync(self) -> None:
        """Header sizes up to date, then everything to the disk."""
        f = self._file
        f.seek(4)
        f.write(struct.pack("<I", 36 + self.data_bytes))
        f.seek(40)
        f.write(struct.pack("<I", self.data_bytes))
        f.seek(0, os.SEEK_END)
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._file.close()


@dataclass
class RecordingFiles:
    wav: Path
    transcript: Path

    @classmethod
    def for_stem(cls, directory: Path, stem: str) -> RecordingFiles:
        return cls(directory / (stem + WAV_SUFFIX), directory / (stem + TRANSCRIPT_SUFFIX))


class Recorder:
    """Records one session. Event-loop methods are O(1) and never touch the disk."""

    def __init__(self, files: RecordingFiles, detokenizer: Detokenizer) -> None:
        self.files = files
        self._detokenizer = detokenizer
        self._frames: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._lines: list[str] = []
        self._wav: WavWriter | None = None
        self._transcript = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._end: dict | None = None
        self.frames = 0
        self.dropped_input_frames = 0
        self.error: str | None = None

    # ---- life cycle ------------------------------------------------------------------

    @classmethod
    async def create(cls, files: RecordingFiles, detokenizer: Detokenizer, header: dict) -> Recorder:
        """Create both files (off the loop) and start the flusher; raises OSError."""
        recorder = cls(files, detokenizer)
        start = {"type": "start", "version": FORMAT_VERSION, "started_at": now_iso(), **header}
        start.update(
            sample_rate=SAMPLE_RATE,
            channels=["user", "model"],
            frame_seconds=FRAME_SECONDS,
            alignment=ALIGNMENT,
        )
        await DISK.run(recorder._open, _line(start))
        recorder._task = asyncio.create_task(recorder._run(), name=f"recorder {files.wav.stem}")
        return recorder

    def _open(self, first_line: str) -> None:
        self.files.wav.parent.mkdir(parents=True, exist_ok=True)
        self._transcript = open(self.files.transcript, "x", encoding="utf-8")  # noqa: SIM115
        try:
            self._transcript.write(first_line)
            self._transcript.flush()
            self._wav = WavWriter(self.files.wav)
            self._wav.sync()
        except BaseException:
            self._transcript.close()
            with contextlib.suppress(OSError):
                self.files.transcript.unlink()
            raise

    async def close(self, reason: str, message: str = "") -> None:
        """Write what is buffered, finalise the header, end the transcript. Never raises.

        Safe to cancel the caller: the work goes on in the recorder's own task.
        """
        if self._end is None:
            self._end = {"reason": reason, "message": message}
            self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    @property
    def done(self) -> bool:
        return self._task is None or self._task.done()

    # ---- event-loop side ---------------------------------------------------------------

    def add(self, result: FrameResult) -> None:
        """One processed frame (runs on the loop for every FrameResult)."""
        if self._end is not None or self.error is not None or result.pcm_in is None:
            return
        if result.text_token is not None:
            text = self._detokenizer.push(result.text_token)
            if text:
                t = round(self.frames * FRAME_SECONDS, 2)
                self._lines.append(_line({"type": "text", "t": t, "frame": self.frames, "text": text}))
        self._frames.append((result.pcm_in, result.pcm))
        self.frames += 1
        if len(self._frames) > MAX_BACKLOG_FRAMES:
            self._fail(f"the disk fell more than {MAX_BACKLOG_FRAMES * FRAME_SECONDS:.0f} s behind")

    def add_dropped(self, count: int) -> None:
        """``count`` input frames were dropped before the model heard them."""
        if self._end is not None or self.error is not None or count <= 0:
            return
        self.dropped_input_frames += count
        t = round(self.frames * FRAME_SECONDS, 2)
        self._lines.append(_line({"type": "input_dropped", "t": t, "frame": self.frames, "frames": count}))

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
            log.error("recording %s stopped: %s (the session goes on)", self.files.wav.stem, why)
        self._frames.clear()

    # ---- writer --------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), FLUSH_SECONDS)
            await self._flush()
        await self._flush()  # what came in while the last write ran
        end = {
            "type": "end",
            "ended_at": now_iso(),
            **(self._end or {}),
            "frames": self.frames,
            "seconds": round(self.frames * FRAME_SECONDS, 2),
            "dropped_input_frames": self.dropped_input_frames,
            "repaired": False,
        }
        if self.error:
            end["recording_error"] = self.error
        try:
            await DISK.run(self._finalise, _line(end))
        except OSError as exc:
            log.error("recording %s could not be finalised: %s", self.files.wav.stem, exc)

    async def _flush(self) -> None:
        frames, self._frames = self._frames, []
        lines, self._lines = self._lines, []
        if not frames and not lines:
            return
        try:
            await DISK.run(self._write, frames, lines)
        except OSError as exc:
            self._fail(f"write failed: {exc}")

    def _write(self, frames: list, lines: list[str]) -> None:
        assert self._wav is not None and self._transcript is not None
        if frames and self.error is None:
            self._wav.append(interleave(frames))
            self._wav.sync()
        if lines:
            self._transcript.write("".join(lines))
            self._transcript.flush()
            os.fsync(self._transcript.fileno())

    def _finalise(self, end_line: str) -> None:
        assert self._wav is not None and self._transcript is not None
        try:
            self._wav.close()
        finally:
            with self._transcript:
                self._transcript.write(end_line)
                self._transcript.flush()
                os.fsync(self._transcript.fileno())


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


# ---- reading and repair ------------------------------------------------------------------


def read_transcript(path: Path) -> dict:
    """The JSONL transcript as one JSON document (a torn last line is skipped)."""
    start: dict = {}
    events: list[dict] = []
    dropped: list[dict] = []
    end: dict | None = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            kind = record.pop("type", None)
            if kind == "start":
                start = record
            elif kind == "text":
                events.append(record)
            elif kind == "input_dropped":
                dropped.append(record)
            elif kind == "end":
                end = record
    return {
        **start,
        "text": "".join(e.get("text", "") for e in events),
        "events": events,
        "input_dropped": dropped,
        "end": end,
        "complete": end is not None,
    }


def _wav_data_bytes(path: Path) -> tuple[int, int] | None:
    """(declared RIFF size, declared data size) when the header is ours, else None."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    if header[36:40] != b"data":
        return None
    riff, data = struct.unpack_from("<I", header, 4)[0], struct.unpack_from("<I", header, 40)[0]
    return riff, data


def repair_wav(path: Path) -> bool:
    """Make the header match the file (whole stereo frames only); True when it changed."""
    size = path.stat().st_size
    declared = _wav_data_bytes(path) if size >= HEADER_BYTES else None
    data = max(0, size - HEADER_BYTES) // BLOCK_ALIGN * BLOCK_ALIGN
    if declared == (36 + data, data) and size == HEADER_BYTES + data:
        return False
    with open(path, "r+b") as f:
        if declared is None:  # torn or foreign header: ours is always the same 44 bytes
            f.seek(0)
            f.write(wav_header(data))
        else:
            f.seek(4)
            f.write(struct.pack("<I", 36 + data))
            f.seek(40)
            f.write(struct.pack("<I", data))
        f.truncate(HEADER_BYTES + data)
        f.flush()
        os.fsync(f.fileno())
    return True


def repair_transcript(path: Path, frames: int) -> bool:
    """End a transcript that has no end record; True when it changed."""
    with open(path, "rb") as f:
        content = f.read()
    last_newline = content.rfind(b"\n")
    complete_lines = content[: last_newline + 1]
    for raw in complete_lines.splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(raw).get("type") == "end":
                if len(complete_lines) != len(content):
                    _rewrite(path, complete_lines)
                return len(complete_lines) != len(content)
    end = {
        "type": "end",
        "ended_at": None,
        "repaired_at": now_iso(),
        "reason": "interrupted",
        "message": "the server stopped without finishing this recording; repaired at the next start",
        "frames": frames,
        "seconds": round(frames * FRAME_SECONDS, 2),
        "repaired": True,
    }
    _rewrite(path, complete_lines + _line(end).encode("utf-8"))
    return True


def _rewrite(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair(files: RecordingFiles) -> bool:
    """Repair one recording left unfinished by a crash; True when anything changed."""
    changed = False
    if files.wav.exists():
        changed |= repair_wav(files.wav)
        frames = (files.wav.stat().st_size - HEADER_BYTES) // (BLOCK_ALIGN * FRAME_SAMPLES)
        if not files.transcript.exists():
            start = {"type": "start", "version": FORMAT_VERSION, "sample_rate": SAMPLE_RATE}
            _rewrite(files.transcript, _line(start).encode("utf-8"))
            changed = True
        changed |= repair_transcript(files.transcript, frames)
    elif files.transcript.exists():
        files.transcript.unlink()  # no audio was ever written: nothing to keep
        changed = True
    return changed
