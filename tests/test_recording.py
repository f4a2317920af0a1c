"""Recording (issue 7): opt-in WAV + transcript, private URLs, crash safety, retention."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import struct
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from robust_helpers import (
    FRAME,
    SAMPLE_RATE,
    audio_messages,
    get,
    read_wav,
    status,
    transcript_lines,
    wait_free,
    wait_until,
    wav_header_consistent,
)

from jmoshi_server import recorder
from jmoshi_server.client import chat_url
from jmoshi_server.config import parse_config
from jmoshi_server.recordings import RecordingStore, stem_for

URL_RE = re.compile(r"/api/recordings/[A-Za-z0-9_-]{43}")


class Chat:
    """A recorded (or not) session driven step by step, reading everything it is sent."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, meta: dict) -> None:
        self.http, self.ws, self.meta = http, ws, meta
        self.errors: list[dict] = []
        self.text = ""
        self.audio_messages = 0
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, server, **query) -> Chat:
        ws = await http.ws_connect(chat_url(server.url, **query))
        first = await ws.receive(timeout=15)
        assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00", first
        meta = await ws.receive(timeout=15)
        assert meta.data[:1] == b"\x04"
        return cls(http, ws, json.loads(meta.data[1:]))

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            kind, payload = msg.data[0], msg.data[1:]
            if kind == 0x01:
                self.audio_messages += 1
            elif kind == 0x02:
                self.text += payload.decode()
            elif kind == 0x05:
                self.errors.append(json.loads(payload))
        self.close_code = self.ws.close_code

    async def stream(self, pcm: np.ndarray) -> None:
        """Send in real time, as a microphone would."""
        started = time.monotonic()
        for i, message in enumerate(audio_messages(pcm)):
            if self.ws.closed:
                return
            await self.ws.send_bytes(message)
            await asyncio.sleep(max(0.0, started + (i + 1) * FRAME / SAMPLE_RATE - time.monotonic()))

    async def close(self, tail: float = 0.5) -> None:
        await asyncio.sleep(tail)
        await self.ws.close()
        await asyncio.wait_for(self._reader, 15)

    async def ended(self, timeout: float = 15) -> None:
        await asyncio.wait_for(self._reader, timeout)


async def available(url: str, timeout: float = 10.0) -> None:
    """The recording is served once its session has finished closing (moments after the end)."""
    await wait_until(lambda: get(url)[0] == 200, timeout, f"{url} becoming available")


def files_of(directory: Path, url: str) -> tuple[Path, Path]:
    stem = stem_for(url.rsplit("/", 1)[1])
    return directory / f"{stem}.wav", directory / f"{stem}.jsonl"


@pytest.fixture(scope="module")
def rec_server(start_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("recordings")
    # A budget far beyond any test's input: nothing is dropped however loaded the machine is,
    # so slot k of a recording is always input frame k.
    server = start_server("--recordings-dir", str(directory), "--input-budget-ms", "60000")
    server.recordings = directory
    return server


async def test_recorded_session_gives_aligned_stereo_wav_and_transcript(rec_server, speech_pcm):
    server = rec_server
    pcm = speech_pcm[: SAMPLE_RATE * 3]
    async with aiohttp.ClientSession() as http:
        chat = await Chat.open(http, server, record=1, seed=7)
        assert chat.meta["recording"] is True
        url = chat.meta["recording_url"]
        assert URL_RE.fullmatch(url), url
        # Not before the session has ended.
        assert get(server.url + url)[0] == 404
        assert get(server.url + url + "?part=transcript")[0] == 404
        before = status(server)["frames_processed"]
        await chat.stream(pcm)
        # Let the model work through the queue (slow on a loaded machine), then close.
        sent = len(pcm) // FRAME
        await wait_until(lambda: status(server)["frames_processed"] - before >= sent, 60, "the model")
        await chat.close(tail=0.3)
    assert chat.errors == []
    await wait_free(server)
    await available(server.url + url)

    code, body, headers = get(server.url + url)
    assert code == 200, body[:200]
    assert headers["Content-Type"] in ("audio/x-wav", "audio/wav", "audio/wave")
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    wav_path, jsonl_path = files_of(server.recordings, url)
    assert wav_path.read_bytes() == body
    assert wav_header_consistent(wav_path)
    params, data = read_wav(wav_path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, SAMPLE_RATE)
    assert params.nframes % FRAME == 0
    slots = params.nframes // FRAME
    # Every input frame was processed and has its slot (the budget drops nothing).
    assert slots == len(pcm) // FRAME, slots
    left, right = data[:, 0].astype(np.float32) / 32767, data[:, 1].astype(np.float32) / 32767
    # Left: the user's speech as the model consumed it (Opus-decoded, so compare loudness).
    assert np.sqrt(np.mean(left**2)) > 0.3 * np.sqrt(np.mean(pcm**2))
    # Right: the model. Its first step yields no audio (the LM's acoustic delay): silence.
    assert not right[:FRAME].any()
    assert np.abs(right[FRAME:]).max() > 0
    # Slot k's left channel is the k-th input frame: the frame energies follow the input's.
    sent = np.array([np.sqrt(np.mean(pcm[i * FRAME : (i + 1) * FRAME] ** 2)) for i in range(slots)])
    heard = np.array([np.sqrt(np.mean(left[i * FRAME : (i + 1) * FRAME] ** 2)) for i in range(slots)])
    assert np.corrcoef(sent[2:], heard[2:])[0, 1] > 0.8

    code, body, headers = get(server.url + url + "?part=transcript")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["complete"] is True and doc["end"]["reason"] == "normal" and doc["end"]["repaired"] is False
    assert doc["end"]["frames"] == slots
    assert doc["sample_rate"] == SAMPLE_RATE and doc["channels"] == ["user", "model"]
    assert doc["sampling"]["seed"] == 7
    # The transcript is the model's text, timed on the WAV's timeline; the client got a prefix
    # of it (what was still queued when it closed is recorded but not sent).
    assert doc["text"] and doc["text"].startswith(chat.text)
    times = [e["t"] for e in doc["events"]]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < slots * 0.08
    assert all(e["t"] == round(e["frame"] * 0.08, 2) for e in doc["events"])
    # On disk: JSONL with a start and an end line.
    lines = transcript_lines(jsonl_path)
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "end"
    assert get(server.url + url + "?part=bogus")[0] == 400


async def test_recording_urls_are_private_to_their_session(rec_server):
    server = rec_server
    urls = []
    async with aiohttp.ClientSession() as http:
        for freq in (220.0, 440.0):
            chat = await Chat.open(http, server, record="1")
            urls.append(chat.meta["recording_url"])
            t = np.arange(SAMPLE_RATE)
            await chat.stream((0.2 * np.sin(t * 2 * np.pi * freq / SAMPLE_RATE)).astype(np.float32))
            await chat.close(tail=0.3)
            await wait_free(server)
            await available(server.url + urls[-1])
        plain = await Chat.open(http, server)
        assert plain.meta["recording"] is False and "recording_url" not in plain.meta
        await plain.close(tail=0)
    await wait_free(server)
    a, b = urls
    assert a != b
    body_a, body_b = get(server.url + a)[1], get(server.url + b)[1]
    assert body_a != body_b
    # Each URL is the session's own: its file, named by a hash the URL does not reveal.
    for url, body in ((a, body_a), (b, body_b)):
        assert files_of(server.recordings, url)[0].read_bytes() == body
    names = " ".join(os.listdir(server.recordings))
    assert a.rsplit("/", 1)[1] not in names and b.rsplit("/", 1)[1] not in names
    # Neighbours, guesses and tricks: all 404, and no listing.
    token = a.rsplit("/", 1)[1]
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    probes = [
        "/api/recordings/" + flipped,
        "/api/recordings/" + secrets.token_urlsafe(32),
        "/api/recordings/" + token[:-1],
        "/api/recordings/" + token + "x",
        "/api/recordings/" + stem_for(token),
        "/api/recordings/" + stem_for(token) + ".wav",
        "/api/recordings",
        "/api/recordings/",
        "/api/recordings/..%2F..%2Fetc%2Fpasswd",
        "/api/recordings/" + token + "/../" + token,
    ]
    for probe in probes:
        code, body, _ = get(server.url + probe)
        assert code == 404, (probe, code, body[:100])
        assert b"RIFF" not in body


async def test_record_parameter_is_validated(rec_server):
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(chat_url(rec_server.url, record="please")) as ws,
    ):
        msg = await ws.receive(timeout=10)
        assert msg.data[:1] == b"\x05"
        error = json.loads(msg.data[1:])
        assert error["code"] == "bad_parameter" and "record" in error["message"]
    await wait_free(rec_server)


async def test_recording_can_be_turned_off(start_server, tmp_path):
    server = start_server("--recordings-dir", str(tmp_path / "rec"), "--no-recording")
    async with aiohttp.ClientSession() as http:
        chat = await Chat.open(http, server, record=1)
        assert chat.meta["recording"] is False and "recording_url" not in chat.meta
        assert "off" in chat.meta["recording_error"]
        await chat.close(tail=0)
    assert not (tmp_path / "rec").exists()


async def test_sigterm_during_recorded_session_finishes_the_recording(start_server, tmp_path, speech_pcm):
    directory = tmp_path / "rec"
    server = start_server("--recordings-dir", str(directory))
    async with aiohttp.ClientSession() as http:
        chat = await Chat.open(http, server, record=1)
        url = chat.meta["recording_url"]
        streaming = asyncio.create_task(chat.stream(np.tile(speech_pcm, 5)))
        await wait_until(lambda: status(server)["frames_processed"] >= 12, 60, "1 s of model time")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await chat.ended(timeout=15)
        streaming.cancel()
        code = await asyncio.to_thread(server.proc.wait, 20)
        took = time.monotonic() - signalled
    print(f"SIGTERM to exit: {took:.2f} s")
    assert code == 0
    assert took < 10, f"shutdown took {took:.1f} s (aim: well inside docker's default 10 s)"
    assert [e["code"] for e in chat.errors] == ["shutting_down"]
    assert chat.close_code == 1001
    wav_path, jsonl_path = files_of(directory, url)
    assert wav_header_consistent(wav_path), "the header was not finalised on SIGTERM"
    params, _ = read_wav(wav_path)
    assert params.nchannels == 2 and params.nframes >= 10 * FRAME
    lines = transcript_lines(jsonl_path)
    assert lines[-1]["type"] == "end" and lines[-1]["reason"] == "shutting_down"
    assert lines[-1]["repaired"] is False and lines[-1]["frames"] == params.nframes // FRAME
    log = server.log_text()
    assert "session ended" in log and "shutting down" in log
    assert "Traceback" not in log


async def test_kill_9_mid_recording_then_restart_repairs_it(start_server, tmp_path, speech_pcm):
    directory = tmp_path / "rec"
    directory.mkdir()
    # An old recording (past --recordings-keep-days) that the restart's retention removes.
    old = RecordingStore(parse_config(["--recordings-dir", str(directory)], env={})).files("ab" * 32)
    old.wav.write_bytes(recorder.wav_header(0))
    old.transcript.write_text('{"type": "start"}\n{"type": "end"}\n')
    month_ago = time.time() - 30 * 86400
    for path in (old.wav, old.transcript):
        os.utime(path, (month_ago, month_ago))

    server = start_server(
        "--recordings-dir", str(directory), "--recordings-keep-days", "7", "--input-budget-ms", "60000"
    )
    assert not old.wav.exists() and not old.transcript.exists(), "retention did not run at start-up"
    async with aiohttp.ClientSession() as http:
        chat = await Chat.open(http, server, record=1)
        url = chat.meta["recording_url"]
        streaming = asyncio.create_task(chat.stream(np.tile(speech_pcm, 5)))
        # Wait for 2 s of model time (longer on a loaded machine), then kill mid-stream.
        await wait_until(lambda: status(server)["frames_processed"] >= 25, 60, "2 s of model time")
        processed = status(server)["frames_processed"]  # this session's steps (warm-up not counted)
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait, 10)
        streaming.cancel()
        with contextlib.suppress(Exception):
            await chat.ended(timeout=5)
    wav_path, jsonl_path = files_of(directory, url)
    assert wav_path.exists() and jsonl_path.exists()
    # At most the last second is lost: the file holds every frame the model had processed
    # when it was killed, but for at most 1 s of them (it flushes every 0.5 s).
    data_bytes = wav_path.stat().st_size - recorder.HEADER_BYTES
    on_disk = data_bytes // (4 * FRAME)
    assert on_disk >= processed - 12, (on_disk, processed)
    assert transcript_lines(jsonl_path)[-1]["type"] != "end"

    # Break it further, as a crash mid-write could: a torn last transcript line, a stale header.
    with open(jsonl_path, "a", encoding="utf-8") as f:
        f.write('{"type": "text", "t": 9')
    with open(wav_path, "r+b") as f:
        f.seek(40)
        f.write(struct.pack("<I", 0))

    restarted = start_server("--recordings-dir", str(directory))
    assert "repaired 1 recording" in restarted.log_text()
    assert wav_header_consistent(wav_path)
    params, _ = read_wav(wav_path)
    assert params.nframes * 4 == data_bytes // 4 * 4
    lines = transcript_lines(jsonl_path)  # every line parses: the torn one is gone
    assert lines[-1]["type"] == "end" and lines[-1]["repaired"] is True
    assert lines[-1]["frames"] == params.nframes // FRAME
    # The session's URL works after the restart: the recording has ended.
    code, body, _ = get(restarted.url + url)
    assert code == 200 and body == wav_path.read_bytes()
    doc = json.loads(get(restarted.url + url + "?part=transcript")[1])
    assert doc["complete"] is True and doc["end"]["reason"] == "interrupted"


def _fake_recording(store: RecordingStore, name: str, size: int, age_days: float) -> str:
    stem = stem_for(name)
    files = store.files(stem)
    files.wav.write_bytes(recorder.wav_header(size) + bytes(size))
    files.transcript.write_text('{"type": "start"}\n{"type": "end"}\n')
    when = time.time() - age_days * 86400
    for path in (files.wav, files.transcript):
        os.utime(path, (when, when))
    return stem


def test_retention_removes_old_then_oldest_over_the_cap(tmp_path):
    config = parse_config(
        ["--recordings-dir", str(tmp_path), "--recordings-keep-days", "7", "--recordings-max-mb", "1"], env={}
    )
    store = RecordingStore(config)
    ancient = _fake_recording(store, "ancient", 1000, 10)
    older = _fake_recording(store, "older", 400_000, 3)
    old = _fake_recording(store, "old", 400_000, 2)
    active = _fake_recording(store, "active", 400_000, 1.5)
    new = _fake_recording(store, "new", 400_000, 1)
    store.active.add(active)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a recording")
    removed = store.prune()
    # Too old first, then the oldest until under 1 MiB; never the one being written.
    assert removed == [ancient, older, old]
    left = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert left == {active, new, "notes"}
    assert foreign.exists()
    # No limits: nothing goes.
    store.keep_seconds = store.max_bytes = 0
    _fake_recording(store, "ancient2", 10, 1000)
    assert store.prune() == []


def test_repair_fixes_torn_files_and_is_idempotent(tmp_path):
    files = recorder.RecordingFiles.for_stem(tmp_path, "c" * 64)
    # A header with provisional sizes, 10 frames and a half-written stereo sample.
    files.wav.write_bytes(recorder.wav_header(0) + bytes(10 * FRAME * 4) + b"\x01\x02\x03")
    files.transcript.write_text('{"type": "start", "version": 1}\n{"type": "text", "t": 0.0, "te')
    assert recorder.repair(files) is True
    assert wav_header_consistent(files.wav)
    params, _ = read_wav(files.wav)
    assert params.nframes == 10 * FRAME
    lines = transcript_lines(files.transcript)
    assert [line["type"] for line in lines] == ["start", "end"] and lines[-1]["frames"] == 10
    assert recorder.repair(files) is False
    # A WAV whose header never made it to disk, and its missing transcript.
    torn = recorder.RecordingFiles.for_stem(tmp_path, "d" * 64)
    torn.wav.write_bytes(bytes(20))
    assert recorder.repair(torn) is True
    assert read_wav(torn.wav)[0].nframes == 0
    assert transcript_lines(torn.transcript)[-1]["repaired"] is True
    # A transcript without audio is dropped.
    orphan = recorder.RecordingFiles.for_stem(tmp_path, "e" * 64)
    orphan.transcript.write_text('{"type": "start"}\n')
    assert recorder.repair(orphan) is True and not orphan.transcript.exists()
