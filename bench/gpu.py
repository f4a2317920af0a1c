"""GPU profile: J-Moshi's full-size architecture with random weights, with and without CUDA graphs.

J-Moshi is Moshi 7B's architecture (moshi's default LM config) with the default Mimi. This
builds both with random weights through moshi's loaders (``get_moshi_lm(None, ...)``,
``get_mimi(None, ...)``), in bfloat16 on the GPU, so nothing is downloaded. Each variant
runs in its own process (CUDA graphs are captured once per process; ``NO_CUDA_GRAPH=1``
turns moshi's graphing off) through jmoshi_server.engine exactly as the server runs it:
warm-up on the model thread, then one session fed a frame every 80 ms.

Reported per variant: per-frame step p50 / p99 (encode, LM, decode, total), real-time
factor, peak VRAM (allocated and reserved by torch; used on the card), time to ready (process
start -> engine ready: imports, building 7B random weights on the GPU, warm-up; loading the
real 15 GB file from disk comes on top and depends on the disk).

    python bench/gpu.py                          # on a CUDA machine: graphs on vs off, 300 frames
    python bench/gpu.py --frames 600 --variants graphs
    python bench/gpu.py --device cpu --tiny --frames 6   # the demo-sized model on CPU (tests)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import numpy as np  # noqa: E402
from benchlib import fmt, machine_line, pct, table  # noqa: E402

VARIANTS = {"graphs": {}, "no-graphs": {"NO_CUDA_GRAPH": "1"}}
STAGES = ("encode", "lm", "decode", "total")


def build_model(device: str, tiny: bool):
    """(LoadedModel, build seconds): random weights, moshi's default (or demo-sized) configs."""
    import torch
    from moshi.models import loaders

    from jmoshi_server.checkpoint import LoadedModel
    from jmoshi_server.demo import DEMO_MIMI_CONFIG, DEMO_VOCAB_SIZE, demo_lm_kwargs

    started = time.perf_counter()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    if tiny:
        lm_kwargs, mimi_config = demo_lm_kwargs(DEMO_VOCAB_SIZE), DEMO_MIMI_CONFIG
    else:
        lm_kwargs, mimi_config = None, None  # moshi's defaults: Moshi 7B / J-Moshi, full Mimi
    lm = loaders.get_moshi_lm(None, lm_kwargs, device=device, dtype=dtype)
    num_codebooks = max(lm.dep_q, lm.n_q - lm.dep_q)
    mimi = loaders.get_mimi(None, mimi_config, device=device, num_codebooks=num_codebooks)
    mimi.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    label = "demo-sized (tiny)" if tiny else "Moshi 7B / J-Moshi architecture"
    model = LoadedModel(mimi, lm, None, f"random {label}", Path("."), torch.device(device), dtype)
    return model, time.perf_counter() - started


def worker(args) -> dict:
    """One variant, in this process; returns the measurements as a dict."""
    import torch
    from frame_loop import run_session

    from jmoshi_server.engine import Engine
    from jmoshi_server.protocol import Sampling

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, build_s = build_model(args.device, args.tiny)
    params = sum(p.numel() for p in model.lm.parameters()) + sum(p.numel() for p in model.mimi.parameters())
    sampling = Sampling(0.7, 25, 0.8, 250, None)
    engine = Engine(model, sampling, warmup_frames=args.warmup_frames)
    warm_started = time.perf_counter()
    engine.start()
    while not engine.ready.is_set():
        if engine.failure:
            raise RuntimeError(engine.failure)
        time.sleep(0.01)
    ready_at = time.perf_counter()
    steps = asyncio.run(run_session(engine, args.frames, not args.closed_loop, np.random.default_rng(0)))
    engine.stop()
    steps = steps[args.skip :]
    out = {
        "params_b": params / 1e9,
        "dtype": str(model.dtype).removeprefix("torch."),
        "build_s": build_s,
        "warmup_s": ready_at - warm_started,
        "ready_s": ready_at - T_START,
        "frames": len(steps),
        **{f"{k}_p{q}": pct([s[k] for s in steps], q) for k in (*STAGES, "model") for q in (50, 99)},
        "rtf": float(np.mean([s["model"] for s in steps])) / 80.0,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(
            {
                "gpu": torch.cuda.get_device_name(),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "used_on_card_gib": (total - free) / 2**30,
            }
        )
    return out


def run_variant(name: str, args) -> dict:
    """Run one variant in a fresh process (CUDA graphs and allocator state start clean)."""
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--frames", str(args.frames)]
    cmd += ["--skip", str(args.skip), "--warmup-frames", str(args.warmup_frames)]
    cmd += ["--tiny"] * args.tiny + ["--closed-loop"] * args.closed_loop
    env = {**os.environ, **VARIANTS[name]}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args) -> None:
    print(machine_line())
    first = next(iter(results.values()))
    print(
        f"model: {'demo-sized' if args.tiny else 'Moshi 7B / J-Moshi architecture'}, random weights, "
        f"{first['params_b']:.2f} B parameters, {first['dtype']} on {args.device}; {first['frames']} frames "
        f"{'closed loop' if args.closed_loop else 'fed every 80 ms'} after {args.skip} skipped"
    )
    print()
    rows = []
    for name, r in results.items():
        for stage in (*STAGES, "model"):
            extra = [fmt(r["rtf"], 3)] if stage == "model" else [""]
            rows.append([name, stage, fmt(r[f"{stage}_p50"]), fmt(r[f"{stage}_p99"]), *extra])
    print(table(["variant", "step (ms)", "p50", "p99", "real-time factor"], rows))
    print()
    rows = [
        [
            name,
            fmt(r.get("peak_allocated_gib"), 2),
            fmt(r.get("peak_reserved_gib"), 2),
            fmt(r.get("used_on_card_gib"), 2),
            fmt(r["build_s"], 1),
            fmt(r["warmup_s"], 1),
            fmt(r["ready_s"], 1),
        ]
        for name, r in results.items()
    ]
    headers = [
        "variant",
        "peak allocated GiB",
        "peak reserved GiB",
        "used on card GiB",
        "build weights s",
        "warm-up s",
        "process start -> ready s",
    ]
    print(table(headers, rows))
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="demo-sized model (for a CPU smoke run)")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--skip", type=int, default=10, help="first frames left out of percentiles")
    parser.add_argument("--warmup-frames", type=int, default=4)
    parser.add_argument("--closed-loop", action="store_true")
    parser.add_argument("--variants", default="graphs,no-graphs", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per variant")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.skip = min(args.skip, max(0, args.frames - 2))
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: this benchmark needs a GPU (or --device cpu --tiny)")
    report({name: run_variant(name, args) for name in args.variants.split(",")}, args)


if __name__ == "__main__":
    main()
