"""Shared pieces of the bench/ scripts: the machine line, percentiles, tables, test speech,
a timestamping chat client, a polling GET loop and /proc sampling.

Not a benchmark itself. The scripts put bench/ on sys.path (Python does when they run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jmoshi_server.client import FRAME_SAMPLES, SAMPLE_RATE, chat_url, ogg_pages, read_audio  # noqa: E402
from jmoshi_server.protocol import Kind  # noqa: E402

__all__ = ["SAMPLE_RATE", "chat_url"]
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE


def test_helpers():
    """tests/conftest.py (ServerProcess, the test sentence); needs the dev extras (pytest)."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    return conftest


def start_jmoshi(log_path: Path, *args: str, demo_dir: Path | None = None, env: dict | None = None):
    """``python -m jmoshi_server --demo`` on a free port (tests/conftest.py's ServerProcess)."""
    from jmoshi_server.demo import ensure_demo_checkpoint

    return test_helpers().ServerProcess(demo_dir or ensure_demo_checkpoint(), log_path, *args, env=env)


@contextlib.contextmanager
def checkout(rev: str, workdir: Path):
    """A detached git worktree of ``rev`` (removed afterwards), to run an earlier server as
    the "before" of a comparison: its directory goes first on ``PYTHONPATH``."""
    path = workdir / f"rev-{rev.replace('/', '_')}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


def free_port() -> int:
    return test_helpers().free_port()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"machine: {platform.machine()}, {cores()} cores ({cpu_name()}), {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, load average {load_average()}"
    )


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def speech(seconds: float, workdir: Path) -> np.ndarray:
    """``seconds`` of Japanese speech from espeak-ng (looped); a synthetic voice-like signal
    when espeak-ng or sox is missing (timing does not depend on the words)."""
    if shutil.which("espeak-ng") and shutil.which("sox"):
        pcm = read_audio(str(test_helpers().make_speech_wav(workdir)))
    else:
        t = np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE
        pcm = (0.2 * np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 3 * t)) * t)).astype(np.float32)
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * SAMPLE_RATE)]


@dataclass
class TimedChat:
    """Everything one chat did, with client-side times (``time.perf_counter``)."""

    connected_at: float = 0.0
    handshake_at: float | None = None
    sent: list[float] = field(default_factory=list)  # per input page
    audio: list[float] = field(default_factory=list)  # per audio message received
    audio_samples: int = 0
    stats: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seconds_in: float = 0.0

    @property
    def first_audio_ms(self) -> float | None:
        return (self.audio[0] - self.sent[0]) * 1000 if self.audio and self.sent else None

    @property
    def out_in_ratio(self) -> float:
        return self.audio_samples / SAMPLE_RATE / self.seconds_in if self.seconds_in else 0.0


async def timed_chat(
    url: str, pcm: np.ndarray, tail_seconds: float = 1.0, wait_handshake: bool = True
) -> TimedChat:
    """Stream ``pcm`` in real time (one 80 ms Ogg/Opus page per frame) and time everything.

    ``wait_handshake=False`` starts sending at once (moshi.server sends its handshake only
    once it holds the lock, as we do, so both are waited for by default).
    """
    import sphn

    chat = TimedChat(seconds_in=len(pcm) / SAMPLE_RATE)
    pages = ogg_pages(pcm)
    reader = sphn.OpusStreamReader(SAMPLE_RATE)

    async def receive(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                continue
            now = time.perf_counter()
            kind, payload = msg.data[0], msg.data[1:]
            if kind == Kind.HANDSHAKE:
                chat.handshake_at = now
            elif kind == Kind.AUDIO:
                chat.audio.append(now)
                chat.audio_samples += reader.append_bytes(payload).size
            elif kind == Kind.STATS:
                chat.stats.append(json.loads(payload))
            elif kind == Kind.ERROR:
                chat.errors.append(json.loads(payload))

    async with aiohttp.ClientSession() as http:
        chat.connected_at = time.perf_counter()
        async with http.ws_connect(url, max_msg_size=0) as ws:
            receiver = asyncio.create_task(receive(ws))
            while wait_handshake and chat.handshake_at is None and not receiver.done():
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            for index, page in enumerate(pages):
                if ws.closed:
                    break
                chat.sent.append(time.perf_counter())
                if page:
                    await ws.send_bytes(bytes((Kind.AUDIO,)) + page)
                delay = t0 + (index + 1) * FRAME_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.sleep(tail_seconds)
            await ws.close()
            await receiver
    return chat


async def poll_get(url: str, stop: asyncio.Event, every: float = 0.02) -> list[float]:
    """GET ``url`` every ``every`` s until ``stop``; milliseconds per request (any status)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            started = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))
    return latencies


def proc_sample(pid: int) -> tuple[int, int]:
    """(resident set size in bytes, open file descriptors) of a process, from /proc."""
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return rss_pages * os.sysconf("SC_PAGE_SIZE"), len(os.listdir(f"/proc/{pid}/fd"))


def fetch_text(url: str, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def prom_values(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text exposition."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def _labels(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    return name, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def histogram_quantile(values: dict[str, float], name: str, q: float, labels: str = "") -> float | None:
    """Prometheus-style quantile (linear inside the bucket) from ``name_bucket`` samples whose
    other labels equal ``labels`` (``'stage="total"'``)."""
    wanted = _labels("{" + labels)[1]
    buckets = []
    for key, count in values.items():
        key_name, key_labels = _labels(key)
        le = key_labels.pop("le", None)
        if key_name == name + "_bucket" and le is not None and key_labels == wanted:
            buckets.append((float(le), count))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 0)
        lower_bound, lower_count = bound, count
    return None
