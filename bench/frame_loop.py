"""Frame loop: encode / LM / decode p50, p95, p99 and the real-time factor, without a network.

Drives ``jmoshi_server.engine`` directly: the model is loaded once (the demo checkpoint, or
--model-dir), then for each variant an Engine starts (warm-up on its own thread, as in the
server), takes a session and steps frames fed at real time (one 80 ms frame every 80 ms, as a
client sends them; --closed-loop feeds the next frame as soon as the last result is back).
Variants are torch CPU thread counts, run in interleaved rounds so a busy machine affects
them alike. Also reported: the thread -> event loop hand-off, Python GC pauses, warm-up.

    python bench/frame_loop.py                         # the server's default vs torch's default
    python bench/frame_loop.py --threads 1,2 --frames 600 --rounds 3
    python bench/frame_loop.py --smoke                 # a few frames (the tests run this)

Real-time factor: mean model time per frame / 80 ms; under 1 keeps up with speech.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from benchlib import cores, fmt, machine_line, pct, table

from jmoshi_server.checkpoint import load_model
from jmoshi_server.config import parse_config
from jmoshi_server.engine import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    Engine,
    FrameResult,
    SessionEnd,
    resolve_torch_threads,
)
from jmoshi_server.protocol import Sampling
from jmoshi_server.runtime import GcPauseTimer

STAGES = ("encode", "lm", "decode", "total")


async def run_session(engine: Engine, frames: int, realtime: bool, rng: np.random.Generator) -> list[dict]:
    """One session of ``frames`` frames; per frame: stage ms, model ms and hand-off ms."""
    loop = asyncio.get_running_loop()
    results: asyncio.Queue = asyncio.Queue()

    def on_result(item) -> None:
        results.put_nowait((time.perf_counter(), item))

    claim = engine.try_claim(engine.default_sampling, frames + 1, loop, on_result)
    assert claim is not None, "the engine is busy"
    assert await claim.ready
    out = []
    t0 = time.perf_counter()
    for index in range(frames):
        frame = (0.1 * rng.standard_normal(FRAME_SAMPLES)).astype(np.float32)
        claim.push(frame, time.perf_counter())
        arrived, item = await results.get()
        assert isinstance(item, FrameResult), item
        t = item.timings
        out.append(
            {
                "encode": t.encode,
                "lm": t.lm,
                "decode": t.decode,
                "total": t.total,
                "model": (item.finished_at - item.started_at) * 1000,
                "wait": (item.started_at - item.received_at) * 1000,
                "handoff": (arrived - item.finished_at) * 1000,
            }
        )
        if realtime:
            await asyncio.sleep(max(0.0, t0 + (index + 1) * FRAME_SECONDS - time.perf_counter()))
    claim.close()
    while not isinstance(item, SessionEnd):
        _, item = await results.get()
    return out


async def run_variant(model, config, threads: int, frames: int, *, realtime: bool, seed: int) -> dict:
    started = time.perf_counter()
    engine = Engine(model, Sampling.defaults(config), config.warmup_frames, torch_threads=threads)
    engine.start()
    while not engine.ready.is_set():
        assert engine.failure is None, engine.failure
        await asyncio.sleep(0.01)
    warmup_s = time.perf_counter() - started
    try:
        pauses: list[float] = []  # ms
        with GcPauseTimer(lambda _generation, seconds: pauses.append(seconds * 1000)):
            steps = await run_session(engine, frames, realtime, np.random.default_rng(seed))
    finally:
        await asyncio.to_thread(engine.stop)
    return {"steps": steps, "warmup_s": warmup_s, "gc": pauses}


def summarise(runs: list[dict], skip: int) -> dict:
    steps = [s for run in runs for s in run["steps"][skip:]]
    first = [run["steps"][0]["total"] for run in runs if run["steps"]]
    col = {key: [s[key] for s in steps] for key in (*STAGES, "model", "wait", "handoff")}
    gc_pauses = [p for run in runs for p in run["gc"]]
    return {
        "frames": len(steps),
        **{f"{k}_p{q}": pct(v, q) for k, v in col.items() for q in (50, 95, 99)},
        "rtf": float(np.mean(col["model"])) / (FRAME_SECONDS * 1000) if steps else float("nan"),
        "over_budget": float(np.mean(np.asarray(col["model"]) > FRAME_SECONDS * 1000)) if steps else 0.0,
        "first_frame_ms": float(np.median(first)) if first else float("nan"),
        "warmup_s": float(np.median([run["warmup_s"] for run in runs])),
        "gc_per_100": 100 * len(gc_pauses) / max(1, len(steps)),
        "gc_max_ms": max(gc_pauses, default=0.0),
    }


def report(results: dict[int, dict], args) -> None:
    print(machine_line())
    pacing = "closed loop" if args.closed_loop else "fed at real time (80 ms)"
    print(f"model: {args.model}, {args.frames} frames per variant in {args.rounds} rounds, {pacing}")
    print()
    rows = []
    for threads, s in results.items():
        for stage in (*STAGES, "model"):
            rows.append(
                [threads, stage, *(fmt(s[f"{stage}_p{q}"]) for q in (50, 95, 99))]
                + ([fmt(s["rtf"], 3), f"{100 * s['over_budget']:.1f}%"] if stage == "model" else ["", ""])
            )
    headers = ["torch threads", "stage (ms)", "p50", "p95", "p99", "real-time factor", "frames > 80 ms"]
    print(table(headers, rows))
    print()
    rows = [
        [
            threads,
            fmt(s["handoff_p50"], 3),
            fmt(s["handoff_p99"], 3),
            fmt(s["wait_p99"], 3),
            fmt(s["first_frame_ms"], 1),
            fmt(s["warmup_s"], 2),
            fmt(s["gc_per_100"], 1),
            fmt(s["gc_max_ms"], 2),
        ]
        for threads, s in results.items()
    ]
    headers = [
        "torch threads",
        "hand-off p50 ms",
        "hand-off p99 ms",
        "queue wait p99 ms",
        "first frame ms",
        "warm-up s",
        "GC runs /100 frames",
        "GC max pause ms",
    ]
    print(table(headers, rows))
    print(json.dumps({str(k): {m: round(v, 4) for m, v in s.items()} for k, s in results.items()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_threads = sorted({resolve_torch_threads(), cores()})
    parser.add_argument(
        "--threads",
        default=",".join(map(str, default_threads)),
        help="comma-separated torch thread counts to compare (default: the server's auto and "
        "torch's own default, one per core)",
    )
    parser.add_argument("--frames", type=int, default=400, help="frames per variant (all rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    parser.add_argument("--skip", type=int, default=5, help="first frames per session not counted")
    parser.add_argument("--closed-loop", action="store_true", help="no 80 ms pacing")
    parser.add_argument("--model-dir", type=Path, help="a J-Moshi directory instead of the demo checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a few frames, to check the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.rounds, args.skip, args.closed_loop = 12, 1, 2, True
    flags = ["--model-dir", str(args.model_dir)] if args.model_dir else ["--demo"]
    config = parse_config([*flags, "--device", args.device], env={})
    args.model = "demo checkpoint" if not args.model_dir else str(args.model_dir)
    model = load_model(config)
    args.model += f" on {model.device} ({str(model.dtype).removeprefix('torch.')})"
    variants = [int(v) for v in args.threads.split(",")]
    per_round = max(args.skip + 1, args.frames // args.rounds)
    runs: dict[int, list[dict]] = defaultdict(list)

    async def go() -> None:
        for r in range(args.rounds):
            for threads in variants if r % 2 == 0 else reversed(variants):
                paced = not args.closed_loop
                run = await run_variant(model, config, threads, per_round, realtime=paced, seed=r)
                runs[threads].append(run)

    asyncio.run(go())
    report({t: summarise(runs[t], args.skip) for t in variants}, args)


if __name__ == "__main__":
    main()
