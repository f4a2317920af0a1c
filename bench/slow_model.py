"""A model slower than real time: latency stays bounded, drops are counted and reported.

Starts jmoshi-server --demo with ``--bench-step-delay-ms`` (every LM step sleeps that long, so
each 80 ms frame takes longer than 80 ms to step: a GPU too slow for J-Moshi) and streams
speech in real time. Two variants in one run:

- ``budget``: the server's default ``--input-budget-ms 240``: at most 3 frames wait; older
  input is dropped, counted, and reported to the page in the stats message;
- ``no-budget``: ``--input-budget-ms`` as long as the session, so nothing is ever dropped and
  the queue (and the delay of every answer) grows without end, as moshi.server's does.

Latency here is per answered frame, from server timestamps (--bench-trace-dir): input
message received -> its answer sent, for the answers sent in the first and in the last 5 s.

    python bench/slow_model.py                       # 20 s, 100 ms delay per step
    python bench/slow_model.py --delay-ms 60 --seconds 60
    python bench/slow_model.py --smoke               # 3 s (the tests run this)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import numpy as np
from benchlib import (
    chat_url,
    fetch_text,
    fmt,
    machine_line,
    pct,
    prom_values,
    speech,
    start_jmoshi,
    table,
    timed_chat,
)

VARIANTS = {"budget": [], "no-budget": ["--input-budget-ms", "100000000"]}


def run_variant(name: str, args, pcm: np.ndarray, workdir: Path) -> dict:
    trace_dir = workdir / f"trace-{name}"
    flags = ["--bench-step-delay-ms", str(args.delay_ms), "--bench-trace-dir", str(trace_dir)]
    server = start_jmoshi(workdir / f"{name}.log", *flags, *VARIANTS[name]).wait_ready()
    try:
        chat = asyncio.run(timed_chat(chat_url(server.url), pcm, tail_seconds=0.5))
        metrics = prom_values(fetch_text(server.url + "/metrics"))
    finally:
        server.stop()
    trace_file = next(trace_dir.glob("session-*.jsonl"))
    trace = [json.loads(line) for line in trace_file.read_text().splitlines()]
    answered = [r for r in trace if r["sent"] is not None]
    # Latency of each answer, by when it was sent: does it grow as the session goes on?
    t0 = answered[0]["sent"] if answered else 0.0
    latency = [((r["sent"] - r["received"]) * 1000, r["sent"] - t0) for r in answered]
    last = latency[-1][1] if latency else 0.0
    early = [ms for ms, at in latency if at < 5]
    late = [ms for ms, at in latency if at >= last - 5]
    stats = chat.stats
    return {
        "frames_in": int(metrics.get("jmoshi_input_frames_total", 0)),
        "stepped": len(trace),
        "dropped_stats": stats[-1]["dropped_frames"] if stats else None,
        "dropped_metric": metrics.get("jmoshi_input_frames_dropped_total"),
        "realtime": sorted({s["realtime"] for s in stats if s["realtime"] is not None}),
        "rtf": [s["realtime_factor"] for s in stats if s["realtime_factor"] is not None],
        "latency_all": [ms for ms, _ in latency],
        "latency_early": early,
        "latency_late": late,
        "out_in": chat.out_in_ratio,
        "errors": chat.errors,
    }


def report(results: dict[str, dict], args, seconds: float) -> None:
    print(machine_line())
    print(
        f"model: demo checkpoint on cpu + {args.delay_ms:g} ms sleep per LM step; "
        f"{seconds:g} s of speech streamed in real time"
    )
    print()
    names = list(results)

    def col(fn):
        return [fn(results[n]) for n in names]

    rows = [
        ["real-time factor (stats message, median)", *col(lambda r: fmt(float(np.median(r["rtf"])), 2))],
        ["stats message says realtime", *col(lambda r: "/".join(map(str, r["realtime"])) or "-")],
        ["input frames queued", *col(lambda r: r["frames_in"])],
        ["frames stepped", *col(lambda r: r["stepped"])],
        [
            "frames dropped (stats message / metric)",
            *col(lambda r: f"{r['dropped_stats']} / {fmt(r['dropped_metric'], 0)}"),
        ],
        [
            "input frames never answered (still queued at the end)",
            *col(lambda r: r["frames_in"] - r["stepped"] - int(r["dropped_metric"] or 0)),
        ],
        ["audio out / audio in", *col(lambda r: fmt(r["out_in"], 2))],
        [
            "latency of answers sent in the first 5 s (ms p50 / max)",
            *col(lambda r: _p50_max(r["latency_early"])),
        ],
        [
            "latency of answers sent in the last 5 s (ms p50 / max)",
            *col(lambda r: _p50_max(r["latency_late"])),
        ],
        ["latency, whole session (ms p99)", *col(lambda r: fmt(pct(r["latency_all"], 99), 0))],
    ]
    print(table(["", *names], rows))
    print()
    print("latency = input message received -> its answer sent, per answered frame (server timestamps)")
    short = {n: {k: v for k, v in r.items() if not k.startswith("latency")} for n, r in results.items()}
    print(json.dumps(short))


def _p50_max(values: list[float]) -> str:
    return f"{fmt(pct(values, 50), 0)} / {fmt(max(values), 0)}" if values else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=100.0, help="sleep per LM step")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--variants", default="budget,no-budget", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--smoke", action="store_true", help="3 s, the default budget only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.variants = 3.0, "budget"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pcm = speech(args.seconds, workdir)
        results = {name: run_variant(name, args, pcm, workdir) for name in args.variants.split(",")}
    report(results, args, args.seconds)


if __name__ == "__main__":
    main()
