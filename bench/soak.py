"""Soak: sessions back to back for N minutes; logs server RSS, descriptors, threads, step times.

Not part of CI. Starts ``jmoshi-server --demo`` (or uses --url; then no /proc figures unless
--pid is given), and runs recorded sessions of Japanese speech from espeak-ng in real time,
one after another, checking each recording can be fetched. One JSON line per session goes
to --log, a table row to stdout, and a summary at the end:

    python bench/soak.py                      # 30 minutes on the demo checkpoint
    python bench/soak.py --minutes 10 --session-seconds 15
    python bench/soak.py --url http://gpu-box:8998 --minutes 60 --no-record

What to look for: RSS, descriptors and threads flat after the first sessions (no leak),
step time p50 flat (no slowdown), no failed sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SPEECH_TEXT, ServerProcess

from jmoshi_server.client import chat_url, converse, read_audio
from jmoshi_server.demo import ensure_demo_checkpoint


def speech(seconds: float, workdir: Path) -> np.ndarray:
    raw, wav = workdir / "raw.wav", workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "ja", "-s", "140", "-w", str(raw), SPEECH_TEXT], check=True)
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(wav)], check=True)
    pcm = read_audio(str(wav))
    reps = int(np.ceil(seconds * 24000 / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * 24000)]


def proc_stats(pid: int | None) -> dict:
    if pid is None:
        return {}
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


async def fetch_recording(http: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """(status, bytes) of a finished session's recording; waits briefly for it to close."""
    for _ in range(50):
        async with http.get(url) as resp:
            body = await resp.read()
            if resp.status == 200:
                return 200, len(body)
        await asyncio.sleep(0.1)
    return resp.status, 0


async def soak(args: argparse.Namespace, base: str, pid: int | None, pcm: np.ndarray, log_file) -> list[dict]:
    rows: list[dict] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60
    previous = get_json(base + "/api/status")
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            index = len(rows) + 1
            t0 = time.monotonic()
            url = chat_url(base, record=1 if args.record else None)
            try:
                result = await converse(url, pcm, tail_seconds=0.5, session=http)
                errors = result.error_codes
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                result, errors = None, [f"client: {type(exc).__name__}: {exc}"]
            recording = None
            recording_url = (result.metadata or {}).get("recording_url") if result else None
            if args.record and recording_url:
                recording = await fetch_recording(http, base + recording_url)
                if recording[0] != 200:
                    errors.append(f"recording fetch {recording[0]}")
            status = get_json(base + "/api/status")
            row = {
                "session": index,
                "minute": round((time.monotonic() - started) / 60, 2),
                "seconds": round(time.monotonic() - t0, 2),
                "errors": errors,
                "audio_out_s": round(len(result.audio) / 24000, 2) if result else 0,
                "first_audio_ms": round(1000 * result.first_audio_seconds)
                if result and result.first_audio_seconds
                else None,
                "step_ms_p50": status.get("step_ms_p50", {}),
                "frames": status["frames_processed"] - previous["frames_processed"],
                "dropped": status["frames_dropped"] - previous["frames_dropped"],
                "recording_bytes": recording[1] if recording else None,
                **proc_stats(pid),
            }
            previous = status
            rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            steps = row["step_ms_p50"]
            outcome = f"ERR {errors}" if errors else "ok"
            print(
                f"{index:4d} {row['minute']:6.1f} min  rss {row.get('rss_mb', '-'):>7} MB  "
                f"fds {row.get('fds', '-'):>3}  thr {row.get('threads', '-'):>3}  "
                f"step p50 {steps.get('total')} ms (lm {steps.get('lm')})  "
                f"frames {row['frames']} dropped {row['dropped']}  {outcome}",
                flush=True,
            )
    return rows


def summarise(rows: list[dict], skip: int) -> dict:
    steady = rows[skip:] or rows

    def span(key: str) -> dict | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        if not values:
            return None
        return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}

    totals = [r["step_ms_p50"].get("total") for r in steady if r["step_ms_p50"].get("total") is not None]
    return {
        "sessions": len(rows),
        "failed_sessions": sum(1 for r in rows if r["errors"]),
        "minutes": rows[-1]["minute"] if rows else 0,
        "frames": sum(r["frames"] for r in rows),
        "dropped": sum(r["dropped"] for r in rows),
        "rss_mb": span("rss_mb"),
        "fds": span("fds"),
        "threads": span("threads"),
        "step_ms_p50_total": {
            "min": min(totals),
            "median": round(statistics.median(totals), 2),
            "max": max(totals),
        }
        if totals
        else None,
        "steady_state_from_session": skip + 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start a demo one)")
    parser.add_argument("--pid", type=int, help="the server's pid, for /proc figures with --url")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--session-seconds", type=float, default=20.0)
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--log", default="soak.jsonl", help="one JSON line per session")
    parser.add_argument("--skip", type=int, default=3, help="sessions before the steady state")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pcm = speech(args.session_seconds, workdir)
        server = None
        if args.url:
            base, pid = args.url.rstrip("/"), args.pid
        else:
            demo = ensure_demo_checkpoint(None)
            server = ServerProcess(
                demo,
                workdir / "server.log",
                "--recordings-dir",
                str(workdir / "recordings"),
                "--recordings-max-mb",
                "200",
            ).wait_ready()
            base, pid = server.url, server.proc.pid
        print(f"machine: {platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
        print(f"server: {base}  pid {pid}  sessions of {args.session_seconds:.0f} s for {args.minutes} min")
        try:
            with open(args.log, "w") as log_file:
                rows = asyncio.run(soak(args, base, pid, pcm, log_file))
        finally:
            if server is not None:
                code = server.stop()
                print(f"server stopped with exit code {code}")
                tail = server.log_path.read_text(errors="replace").splitlines()
                problems = [line for line in tail if " ERROR " in line or "Traceback" in line]
                print(f"server log: {len(tail)} lines, {len(problems)} errors")
        summary = summarise(rows, args.skip)
        print(json.dumps(summary, indent=2))
        return 1 if summary["failed_sessions"] else 0


if __name__ == "__main__":
    sys.exit(main())
