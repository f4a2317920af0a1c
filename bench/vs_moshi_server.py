"""jmoshi-server and Kyutai's ``python -m moshi.server`` side by side, same checkpoint, one run.

Both load the demo checkpoint (the same files) on this machine's CPU and get the same
Japanese speech streamed in real time, one 80 ms Ogg/Opus page per frame, while ``GET`` is
polled every 20 ms (ours: /healthz; moshi.server has no health route, and ``GET /`` with
``--static none`` is a quick 404 that still has to wait for its event loop). Each server
runs once per round in a fresh process; rounds alternate the order.

Measured for each: start -> ready, time to first audio (first page sent -> first audio
received), audio out / audio in, the per-frame round trip seen by the client, the server's own
per-frame model figure, server-added latency, GET latency.

Server-added latency = input page received -> answering output page sent, minus the model
step. For jmoshi-server it is exact, from per-frame server timestamps (--bench-trace-dir).
moshi.server has no such trace; its stdout says "frame handled in X ms" per input frame
(decode excluded; encode, LM, decode, Opus encode and send included), so for both the
client-side estimate is: round trip - the server's per-frame figure (includes loopback).

moshi.server runs through bench/moshi_server_cpu.py (torch.cuda.synchronize patched out
for its warm-up; LM in float32 like ours on CPU; NO_TORCH_COMPILE=1 as our engine does on CPU).

    python bench/vs_moshi_server.py                         # 20 s sessions, 2 rounds
    python bench/vs_moshi_server.py --variants jmoshi,jmoshi-2threads,moshi.server
    python bench/vs_moshi_server.py --hog 1                 # with a busy process sharing the CPU
    python bench/vs_moshi_server.py --smoke                 # 2 s, 1 round (the tests run this)
    python bench/vs_moshi_server.py --variants jmoshi --baseline HEAD~3   # before / after a change

Targets: jmoshi-server GET p99 under 10 ms; server-added latency p99 at most 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
from benchlib import (
    TimedChat,
    chat_url,
    checkout,
    fetch_text,
    fmt,
    free_port,
    histogram_quantile,
    machine_line,
    pct,
    poll_get,
    prom_values,
    speech,
    start_jmoshi,
    table,
    test_helpers,
    timed_chat,
)

from jmoshi_server.demo import MIMI_CONFIG_NAME, ensure_demo_checkpoint

HERE = Path(__file__).resolve().parent
LOOP_LAG = "jmoshi_event_loop_lag_seconds"
HANDLED = re.compile(r"frame handled in ([0-9.]+) ?ms")

# name -> (kind, extra flags for jmoshi-server)
VARIANTS = {
    "jmoshi": ("jmoshi", []),
    "jmoshi-2threads": ("jmoshi", ["--torch-threads", "2"]),  # before the thread-count fix
    "jmoshi-cpu-split": ("jmoshi", ["--cpu-split"]),  # loop and model pinned apart (opt-in)
    "moshi.server": ("moshi", []),
    # Not how it ships: torch's default thread count hurts it on 2 cores as it hurt us.
    "moshi.server-1thread": ("moshi", ["--torch-threads", "1"]),
}


class MoshiServer:
    """``python -m moshi.server`` with the demo checkpoint, through the CPU launcher."""

    def __init__(self, demo_dir: Path, workdir: Path, launcher_flags: list[str]) -> None:
        config = json.loads((demo_dir / "config.json").read_text())
        # moshi's loader fetches a relative mimi config name from its default hub repo.
        config["mimi_config_name"] = "file://" + str(demo_dir / MIMI_CONFIG_NAME)
        config_path = workdir / "moshi-config.json"
        config_path.write_text(json.dumps(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"moshi-server-{self.port}.log"
        cmd = [
            sys.executable,
            str(HERE / "moshi_server_cpu.py"),
            "--lm-dtype",
            "float32",
            *launcher_flags,
            "--",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--static",
            "none",
            "--moshi-weight",
            str(demo_dir / config["moshi_name"]),
            "--mimi-weight",
            str(demo_dir / config["mimi_name"]),
            "--tokenizer",
            str(demo_dir / config["tokenizer_name"]),
            "--config-path",
            str(config_path),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "NO_TORCH_COMPILE": "1"}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> MoshiServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moshi.server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=2)
            except urllib.error.HTTPError:
                return self  # 404 from its router: it is serving
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
                continue
            return self
        raise TimeoutError(f"moshi.server not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        test_helpers().stop_process(self.proc, self._log)


def read_trace(trace_dir: Path) -> list[dict]:
    files = sorted(trace_dir.glob("session-*.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


async def session(base: str, poll_path: str, pcm: np.ndarray) -> tuple[TimedChat, list[float]]:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_get(base + poll_path, stop))
    await asyncio.sleep(0.2)
    try:
        chat = await timed_chat(chat_url(base), pcm, tail_seconds=1.0)
    finally:
        stop.set()
    return chat, await poller


def run_once(
    name: str, demo_dir: Path, workdir: Path, pcm: np.ndarray, env: dict[str, str] | None = None
) -> dict:
    """One session of variant ``name``; ``env`` is added to a jmoshi-server's environment."""
    kind, flags = VARIANTS.get(name, ("jmoshi", []))  # jmoshi@REV: no flags of its own
    started = time.perf_counter()
    trace_dir = workdir / f"trace-{name}-{time.monotonic_ns()}"
    if kind == "jmoshi":
        log = workdir / f"{name}-{time.monotonic_ns()}.log"
        server = start_jmoshi(log, "--bench-trace-dir", str(trace_dir), *flags, demo_dir=demo_dir, env=env)
        poll_path = "/healthz"
    else:
        server = MoshiServer(demo_dir, workdir, flags)
        poll_path = "/"
    try:
        server.wait_ready()
        ready_s = time.perf_counter() - started
        before = prom_values(fetch_text(server.url + "/metrics")) if kind == "jmoshi" else {}
        chat, gets = asyncio.run(session(server.url, poll_path, pcm))
        time.sleep(0.5)  # let the server finish writing its trace / log
        after = prom_values(fetch_text(server.url + "/metrics")) if kind == "jmoshi" else {}
        log_text = server.log_text()
    finally:
        server.stop()
    run = {"ready_s": ready_s, "chat": chat, "gets": gets, "loop_lag": None}
    if kind == "jmoshi":  # the server's own event-loop lag metric, this session only
        lag = {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(LOOP_LAG)}
        run["loop_lag"] = {q: histogram_quantile(lag, LOOP_LAG, q) for q in (0.5, 0.99)}
    if kind == "jmoshi":
        trace = read_trace(trace_dir)
        run["model_ms"] = [(r["finished"] - r["started"]) * 1000 for r in trace]
        answered = [r for r in trace if r["sent"] is not None and r["received"] is not None]
        run["added_ms"] = [
            ((r["sent"] - r["received"]) - (r["finished"] - r["started"])) * 1000 for r in answered
        ]
        # Its two halves: Opus decode + queue + wake-up, and hand-off + Opus encode + send.
        run["in_ms"] = [(r["started"] - r["received"]) * 1000 for r in answered]
        run["out_ms"] = [(r["sent"] - r["finished"]) * 1000 for r in answered]
        run["dropped"] = chat.stats[-1]["dropped_frames"] if chat.stats else None
    else:
        run["model_ms"] = [float(m) for m in HANDLED.findall(log_text)]
        run["added_ms"] = run["in_ms"] = run["out_ms"] = None
        run["dropped"] = 0  # it never drops: it falls behind instead
    # Per-frame round trip: the n-th audio message answers input page n + lag (the model's delay).
    lag = len(chat.sent) - len(chat.audio)
    run["lag"] = lag
    if 0 <= lag <= 4 and not run["dropped"] and chat.audio:
        rtt = [(chat.audio[n] - chat.sent[n + lag]) * 1000 for n in range(len(chat.audio))]
        model = run["model_ms"]
        run["rtt_ms"] = rtt
        run["client_added_ms"] = [r - model[n + lag] for n, r in enumerate(rtt) if n + lag < len(model)]
    else:  # frames were dropped or not answered before the end: no one-to-one pairing
        run["rtt_ms"], run["client_added_ms"] = [], []
    return run


def p50_99(values: list[float] | None, digits: int = 1) -> str:
    if not values:
        return "-"
    return f"{fmt(pct(values, 50), digits)} / {fmt(pct(values, 99), digits)}"


def merge(runs: list[dict]) -> dict:
    out: dict = defaultdict(list)
    for run in runs:
        for key in ("gets", "rtt_ms", "model_ms", "client_added_ms"):
            out[key] += run[key]
        for key in ("added_ms", "in_ms", "out_ms"):
            if run[key] is not None:
                out[key] += run[key]
        out["ready_s"].append(run["ready_s"])
        out["first_audio_ms"].append(run["chat"].first_audio_ms)
        out["ratio"].append(run["chat"].out_in_ratio)
        out["dropped"].append(run["dropped"])
        out["lag"].append(run["lag"])
        out["loop_lag"].append(run["loop_lag"])
        out["errors"] += run["chat"].errors
    return dict(out)


def per_round(runs: dict[str, list[dict]]) -> None:
    """GET p99 and server-added p99 of every session: how much one run varies from the next."""
    rows = []
    for name, name_runs in runs.items():
        for index, run in enumerate(name_runs):
            added = run["added_ms"] or run["client_added_ms"]
            gets = run["gets"]
            rows.append([name, index + 1, fmt(pct(gets, 99), 2), fmt(max(gets), 1), fmt(pct(added, 99), 2)])
    print(table(["variant", "round", "GET p99 ms", "GET max ms", "server-added p99 ms [4]"], rows))
    print("[4] jmoshi: server timestamps; moshi.server: client estimate (- when not pairable)")
    print()


def _lags(result: dict) -> str:
    lags = [lag for lag in result["loop_lag"] if lag]
    if not lags:
        return "n/a"
    return ", ".join(f"{fmt((lag[0.5] or 0) * 1000, 1)} / {fmt((lag[0.99] or 0) * 1000, 1)}" for lag in lags)


def report(results: dict[str, dict], args) -> dict:
    print(machine_line())
    print(
        f"model: demo checkpoint on cpu (float32) in both; {args.seconds:g} s of speech per session, "
        f"{args.rounds} round(s), GET every 20 ms during each session"
        + (f"; {args.hog} busy-loop process(es) sharing the CPU" if args.hog else "")
    )
    print()
    names = list(results)
    med = lambda values: float(np.median([v for v in values if v is not None])) if values else None  # noqa: E731
    rows = [
        ["start -> ready (s, median)", *(fmt(med(results[n]["ready_s"]), 1) for n in names)],
        ["time to first audio (ms, median)", *(fmt(med(results[n]["first_audio_ms"]), 0) for n in names)],
        ["audio out / audio in", *(fmt(min(results[n]["ratio"]), 3) for n in names)],
        ["input pages not answered by the end", *(",".join(map(str, results[n]["lag"])) for n in names)],
        ["round trip per frame, client (ms p50 / p99)", *(p50_99(results[n]["rtt_ms"]) for n in names)],
        ["server's per-frame figure (ms p50 / p99) [1]", *(p50_99(results[n]["model_ms"]) for n in names)],
        [
            "server-added, server timestamps (ms p50 / p99 / max)",
            *(
                (p50_99(results[n]["added_ms"], 2) + f" / {fmt(max(results[n]['added_ms']), 2)}")
                if results[n].get("added_ms")
                else "n/a (no trace)"
                for n in names
            ),
        ],
        [
            "  of which: received -> model starts (ms p50 / p99)",
            *(p50_99(results[n].get("in_ms"), 2) for n in names),
        ],
        [
            "  of which: model done -> audio sent (ms p50 / p99)",
            *(p50_99(results[n].get("out_ms"), 2) for n in names),
        ],
        [
            "server-added, client estimate (ms p50 / p99) [2]",
            *(p50_99(results[n]["client_added_ms"]) for n in names),
        ],
        ["GET every 20 ms (ms p50 / p99)", *(p50_99(results[n]["gets"], 2) for n in names)],
        ["GET max (ms)", *(fmt(max(results[n]["gets"], default=float("nan")), 1) for n in names)],
        ["event-loop lag, server metric (ms p50 / p99, per round) [3]", *(_lags(results[n]) for n in names)],
        ["input frames dropped", *(",".join(str(d) for d in results[n]["dropped"]) for n in names)],
    ]
    print(table(["", *names], rows))
    print()
    print("[1] jmoshi-server: model thread time per frame (encode + LM + decode). moshi.server: its log's")
    print("    'frame handled in', which also includes its Opus encode and send.")
    print("[2] round trip - [1], paired per frame; includes loopback network both ways and the Opus decode.")
    print("[3] jmoshi_event_loop_lag_seconds during the session: how late a 100 ms sleep woke (bucketed).")
    summary = {}
    for n in names:
        r = results[n]
        summary[n] = {
            "get_p99_ms": round(pct(r["gets"], 99), 2),
            "first_audio_ms": med(r["first_audio_ms"]),
            "out_in_ratio": round(min(r["ratio"]), 3),
            "server_added_p99_ms": round(pct(r["added_ms"], 99), 3) if r.get("added_ms") else None,
            "client_added_p99_ms": round(pct(r["client_added_ms"], 99), 2) if r["client_added_ms"] else None,
            "errors": r["errors"],
        }
    if "jmoshi" in summary:
        ours = summary["jmoshi"]
        print()
        get_p99 = ours["get_p99_ms"]
        print(f"target GET p99 < 10 ms: {get_p99} ms -> {'met' if get_p99 < 10 else 'MISSED'}")
        added = ours["server_added_p99_ms"]
        if added is not None:
            print(f"target server-added p99 <= 2 ms: {added} ms -> {'met' if added <= 2 else 'MISSED'}")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="speech per session")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="jmoshi,moshi.server", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument(
        "--hog",
        type=int,
        default=0,
        help="busy-loop processes kept running during the sessions (another app, or the browser, "
        "sharing the CPU)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run jmoshi-server as of this git revision (variant jmoshi@REV), for before / after",
    )
    parser.add_argument("--smoke", action="store_true", help="2 s sessions, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = 2.0, 1
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    demo_dir = ensure_demo_checkpoint()
    runs: dict[str, list[dict]] = defaultdict(list)
    envs: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        if args.baseline:
            before = stack.enter_context(checkout(args.baseline, workdir))
            names.insert(0, f"jmoshi@{args.baseline}")
            # jmoshi@REV runs from the worktree, first on PYTHONPATH.
            envs[names[0]] = {"PYTHONPATH": str(before)}
        pcm = speech(args.seconds, workdir)
        # This process imported torch too: keep its own full collections (~100 ms) out of
        # the GET and round-trip figures it measures.
        gc.collect()
        gc.freeze()
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
        try:
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else list(reversed(names)):
                    runs[name].append(run_once(name, demo_dir, workdir, pcm, envs.get(name)))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    summary = report({n: merge(runs[n]) for n in names}, args)
    if args.rounds > 1:
        print()
        per_round(runs)
    return summary


if __name__ == "__main__":
    main()
