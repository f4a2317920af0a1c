"""How long the event loop waits behind the model thread: GIL switch interval, CPU split, GC.

One process, as in the server: the demo model steps on the engine's thread, fed one frame
every 80 ms, while a probe on the event loop sleeps 2 ms again and again and records how late
it woke. That lateness is what a GET, an outgoing audio page or a received one waits while
the model holds the GIL or the CPU. Variants (interleaved rounds, same model, same process):

- ``5ms``: Python's default GIL switch interval, no pinning (the server's default);
- ``0.5ms``: a shorter switch interval (the holder is made to let go sooner);
- ``5ms+split`` / ``0.5ms+split``: as ``--cpu-split`` (loop on one CPU, model on the others).

Then the garbage collector: a full collection with the model loaded, before and after
``gc.freeze()`` (the server freezes once warm: ``--gc-freeze``).

    python bench/loop_wait.py                 # 2 rounds of 15 s per variant
    python bench/loop_wait.py --smoke         # 1 round of 2 s (the tests run this)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
from benchlib import fmt, machine_line, pct, table
from frame_loop import run_session

from jmoshi_server import runtime
from jmoshi_server.checkpoint import load_model
from jmoshi_server.config import parse_config
from jmoshi_server.engine import FRAME_SECONDS, Engine
from jmoshi_server.protocol import Sampling

PROBE_S = 0.002
# name -> (GIL switch interval ms, CPU split)
VARIANTS = {"5ms": (5.0, False), "0.5ms": (0.5, False), "5ms+split": (5.0, True), "0.5ms+split": (0.5, True)}


async def probe(stop: asyncio.Event) -> list[float]:
    """How late (ms) each 2 ms sleep on the event loop woke."""
    late = []
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        late.append((time.perf_counter() - started - PROBE_S) * 1000)
    return late


async def run_variant(
    model, config, switch_ms: float, split: runtime.CpuSplit | None, seconds: float
) -> dict:
    everywhere = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    sys.setswitchinterval(switch_ms / 1000)
    if split is not None:
        runtime.pin_this_thread(split.loop)
    engine = Engine(
        model,
        Sampling.defaults(config),
        config.warmup_frames,
        cpus=split.model if split else None,
    )
    try:
        engine.start()
        while not engine.ready.is_set():
            assert engine.failure is None, engine.failure
            await asyncio.sleep(0.01)
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(stop))
        frames = max(3, int(seconds / FRAME_SECONDS))
        steps = await run_session(engine, frames, realtime=True, rng=np.random.default_rng(0))
        stop.set()
        late = await prober
    finally:
        await asyncio.to_thread(engine.stop)
        if everywhere is not None and split is not None:
            runtime.pin_this_thread(frozenset(everywhere))
    steps = steps[2:]  # the first frames warm caches
    return {"late": late, "handoff": [s["handoff"] for s in steps], "model": [s["model"] for s in steps]}


def full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 s")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = 2.0, 1
    config = parse_config(["--demo"], env={})
    model = load_model(config)
    split = runtime.plan_split()
    names = [n for n, (_, pinned) in VARIANTS.items() if split is not None or not pinned]
    default_switch = sys.getswitchinterval()
    runs: dict[str, list[dict]] = defaultdict(list)

    async def go() -> None:
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                switch_ms, pinned = VARIANTS[name]
                run = await run_variant(model, config, switch_ms, split if pinned else None, args.seconds)
                runs[name].append(run)

    try:
        asyncio.run(go())
    finally:
        sys.setswitchinterval(default_switch)
    gc_before = [full_collection_ms() for _ in range(3)]
    gc.freeze()
    frozen = gc.get_freeze_count()
    gc_after = [full_collection_ms() for _ in range(3)]
    gc.unfreeze()

    print(machine_line())
    print(
        f"demo model fed at real time; {args.rounds} round(s) of {args.seconds:g} s per variant; "
        "probe: 2 ms sleeps on the event loop"
    )
    if split is None:
        print("fewer than two CPUs (or no affinity API): the +split variants were skipped")
    print()
    rows, summary = [], {}
    for name in names:
        late = [v for run in runs[name] for v in run["late"]]
        handoff = [v for run in runs[name] for v in run["handoff"]]
        model_ms = [v for run in runs[name] for v in run["model"]]
        rows.append(
            [
                name,
                f"{fmt(pct(late, 50), 3)} / {fmt(pct(late, 99), 2)} / {fmt(max(late), 1)}",
                f"{fmt(pct(handoff, 50), 3)} / {fmt(pct(handoff, 99), 2)}",
                f"{fmt(pct(model_ms, 50), 1)} / {fmt(pct(model_ms, 99), 1)}",
                len(late),
            ]
        )
        summary[name] = {"late_p99_ms": round(pct(late, 99), 3), "handoff_p99_ms": round(pct(handoff, 99), 3)}
    headers = [
        "variant",
        "loop wake-up late (ms p50 / p99 / max)",
        "model -> loop hand-off (ms p50 / p99)",
        "model step (ms p50 / p99)",
        "probes",
    ]
    print(table(headers, rows))
    print()
    print(
        table(
            ["full garbage collection, model loaded", "ms (3 runs)"],
            [
                ["tracked normally", " / ".join(fmt(v, 1) for v in gc_before)],
                [f"after gc.freeze() ({frozen} objects)", " / ".join(fmt(v, 2) for v in gc_after)],
            ],
        )
    )
    summary["gc_full_ms"] = {"before": round(min(gc_before), 2), "frozen": round(min(gc_after), 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
