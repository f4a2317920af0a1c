"""Helpers shared by the recording, fault and fuzz tests."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np

from jmoshi_server.client import ogg_pages

SAMPLE_RATE = 24_000
FRAME = 1920


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict]:
    """(status, body, headers) of a GET, errors included; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)
    except (urllib.error.URLError, OSError):
        return 0, b"", {}


def status(server) -> dict:
    return json.loads(get(server.url + "/api/status")[1])


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``predicate`` (a plain function) until true; returns the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def wait_free(server, timeout: float = 15.0) -> None:
    await wait_until(lambda: not status(server)["busy"], timeout, "the model being free")


def proc_stats(pid: int) -> dict:
    """RSS (MiB), open descriptors and threads of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds))
    return (0.2 * np.sin(t * 2 * np.pi * freq / SAMPLE_RATE)).astype(np.float32)


def audio_messages(pcm: np.ndarray) -> list[bytes]:
    """0x01 messages for ``pcm``, one Ogg page group per 80 ms (empty ones left out)."""
    return [b"\x01" + page for page in ogg_pages(pcm) if page]


def read_wav(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    """Parameters and int16 samples (frames x channels) through Python's own wave module."""
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        data = np.frombuffer(w.readframes(params.nframes), dtype="<i2").reshape(-1, params.nchannels)
    return params, data


def wav_header_consistent(path: Path) -> bool:
    """Both RIFF sizes match the file's length exactly (a finalised header)."""
    raw = path.read_bytes()
    riff = int.from_bytes(raw[4:8], "little")
    data = int.from_bytes(raw[40:44], "little")
    return riff == len(raw) - 8 and data == len(raw) - 44


def transcript_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def session_works(server, timeout: float = 60.0) -> None:
    """A normal session: handshake, real-time audio in, model audio back, no error.

    Waits for the model's audio however long a loaded machine takes (up to ``timeout``)
    instead of streaming for a fixed time.
    """
    import aiohttp

    from jmoshi_server.client import chat_url

    messages = audio_messages(tone(30.0))
    async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server.url)) as ws:
        first = await ws.receive(timeout=timeout)
        assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00", first
        await ws.receive(timeout=timeout)  # metadata
        got_audio = asyncio.Event()
        errors: list[bytes] = []

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                    got_audio.set()
                elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
                    errors.append(msg.data)

        reader = asyncio.create_task(read())
        started = time.monotonic()
        for i, message in enumerate(messages):
            if got_audio.is_set() or reader.done() or time.monotonic() - started > timeout:
                break
            await ws.send_bytes(message)
            await asyncio.sleep(max(0.0, started + (i + 1) * FRAME / SAMPLE_RATE - time.monotonic()))
        assert got_audio.is_set(), f"no audio back within {timeout} s (errors: {errors})"
        assert errors == [], errors
        await ws.close()
        await asyncio.wait_for(reader, 15)
    await wait_free(server)
