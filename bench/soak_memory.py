"""A long session (10 minutes by default): the server's RSS and open file descriptors over time.

Starts jmoshi-server --demo (no session time limit), streams speech in real time for
--seconds, and samples /proc/<pid>/statm and /proc/<pid>/fd every --sample-every seconds.
Growth is measured after a warm-in (allocator pools, Opus and torch caches fill during the
first minute): last sample minus the sample at the end of the warm-in, and the slope of a
least-squares line through every sample after it. Target: growth under 1 MB.

    python bench/soak_memory.py                        # 600 s
    python bench/soak_memory.py --seconds 180 --warm-in 30
    python bench/soak_memory.py --smoke                # 6 s (the tests run this)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import (
    TimedChat,
    chat_url,
    fmt,
    machine_line,
    proc_sample,
    speech,
    start_jmoshi,
    table,
    timed_chat,
)

MB = 1024 * 1024


async def soak(url: str, pid: int, pcm: np.ndarray, every: float) -> tuple[list, TimedChat]:
    """Stream ``pcm`` while sampling (seconds, RSS bytes, open fds) of ``pid``."""
    samples: list[tuple[float, int, int]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, *proc_sample(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    task = asyncio.create_task(sampler())
    try:
        chat = await timed_chat(url, pcm, tail_seconds=0.5)
    finally:
        stop.set()
        await task
    return samples, chat


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="session length")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--warm-in", type=float, help="seconds not counted (default 10%%, <= 60)")
    parser.add_argument("--smoke", action="store_true", help="a 3 s session sampled twice a second")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.sample_every = 3.0, 0.5
    settle = 0.5 if args.smoke else 2.0
    warm_in = args.warm_in if args.warm_in is not None else min(60.0, args.seconds / 10)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pcm = speech(args.seconds, workdir)
        server = start_jmoshi(workdir / "server.log", "--max-session-seconds", "0").wait_ready()
        pid = server.proc.pid
        try:
            time.sleep(settle)
            ready_rss, ready_fds = proc_sample(pid)
            samples, chat = asyncio.run(soak(chat_url(server.url), pid, pcm, args.sample_every))
            time.sleep(settle)
            after_rss, after_fds = proc_sample(pid)
        finally:
            server.stop()
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=float)
    fds = np.array([s[2] for s in samples])
    base = int(np.searchsorted(t, warm_in))
    base = min(base, len(t) - 2)
    growth = rss[-1] - rss[base]
    slope = float(np.polyfit(t[base:], rss[base:], 1)[0]) if len(t) - base >= 2 else float("nan")
    print(machine_line())
    print(
        f"model: demo checkpoint on cpu; one session of {args.seconds:g} s streamed in real time; "
        f"samples every {args.sample_every:g} s; warm-in {warm_in:g} s"
    )
    print()
    rows = [
        ["model ready, before the session", fmt(ready_rss / MB, 1), ready_fds],
        ["session start", fmt(rss[0] / MB, 1), fds[0]],
        [f"after the warm-in ({t[base]:.0f} s)", fmt(rss[base] / MB, 1), fds[base]],
        [f"session end ({t[-1]:.0f} s)", fmt(rss[-1] / MB, 1), fds[-1]],
        [f"{settle:g} s after the session", fmt(after_rss / MB, 1), after_fds],
    ]
    print(table(["when", "RSS MB", "open fds"], rows))
    print()
    rows = [
        ["RSS growth after the warm-in (last - warm-in sample)", f"{growth / MB:+.2f} MB"],
        ["RSS trend after the warm-in (least squares)", f"{slope * 60 / MB:+.3f} MB/min"],
        ["RSS peak during the session", f"{rss.max() / MB:.1f} MB"],
        ["open fds during the session (min / max)", f"{fds.min()} / {fds.max()}"],
        ["audio out / audio in", fmt(chat.out_in_ratio, 3)],
        ["errors from the server", len(chat.errors)],
    ]
    print(table(["", "value"], rows))
    print(f"\ntarget growth < 1 MB: {growth / MB:+.2f} MB -> {'met' if abs(growth) < MB else 'MISSED'}")
    summary = {
        "seconds": args.seconds,
        "growth_mb": round(growth / MB, 3),
        "slope_mb_per_min": round(slope * 60 / MB, 4),
        "fds": [int(fds.min()), int(fds.max())],
        "fds_before_after": [ready_fds, after_fds],
        "out_in": round(chat.out_in_ratio, 3),
        "errors": chat.errors,
        "series_mb": [[round(float(a), 1), round(float(b) / MB, 2)] for a, b in zip(t, rss, strict=True)],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
