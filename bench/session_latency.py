"""Event-loop responsiveness and per-frame model time during a real session.

Starts ``jmoshi-server --demo`` (or uses --url), streams Japanese speech from espeak-ng in
real time, and meanwhile polls ``GET /healthz`` every 20 ms. Prints a table:

    python bench/session_latency.py            # demo checkpoint on this machine
    python bench/session_latency.py --url http://host:8998 --seconds 30

Target: /healthz p99 under 10 ms (moshi.server runs the model on its event loop: p99 136 ms
measured on this project's 2-core dev machine kind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from benchlib import machine_line, speech, start_jmoshi

from jmoshi_server.client import chat_url, converse


async def poll(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            started = time.perf_counter()
            async with http.get(url + "/healthz") as resp:
                await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - started)))
    return latencies


async def measure(url: str, pcm: np.ndarray) -> dict:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll(url, stop))
    result = await converse(chat_url(url), pcm, tail_seconds=0.5)
    stop.set()
    latencies = await poller
    async with aiohttp.ClientSession() as http, http.get(url + "/api/status") as resp:
        status = await resp.json()
    return {"latencies": latencies, "result": result, "status": status}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start a demo server)")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pcm = speech(args.seconds, workdir)
        server = None
        url = args.url
        if url is None:
            server = start_jmoshi(workdir / "server.log").wait_ready()
            url = server.url
        try:
            out = asyncio.run(measure(url, pcm))
        finally:
            if server:
                server.stop()
    lat, result, status = out["latencies"], out["result"], out["status"]
    steps = status.get("step_ms_p50", {})
    print(machine_line())
    print(f"model: {status.get('model')} on {status.get('device')} ({status.get('dtype')})")
    print(
        f"session: {len(pcm) / 24000:.1f} s in, {len(result.audio) / 24000:.1f} s out, "
        f"first audio after {1000 * (result.first_audio_seconds or 0):.0f} ms"
    )
    print()
    print("| GET /healthz every 20 ms during the session | value |")
    print("|---|---|")
    print(f"| requests | {len(lat)} |")
    for q in (50, 90, 99):
        print(f"| p{q} | {pct(lat, q):.2f} ms |")
    print(f"| max | {max(lat):.2f} ms |")
    print()
    print("| per-frame model time (p50 of the last 250 frames) | ms |")
    print("|---|---|")
    for stage in ("encode", "lm", "decode", "total"):
        print(f"| {stage} | {steps.get(stage)} |")
    print("| frame budget (real time) | 80 |")
    print(json.dumps({"healthz_p99_ms": round(pct(lat, 99), 2), "step_ms_p50": steps}))


if __name__ == "__main__":
    main()
