"""Metrics, live stats and the benchmark scripts.

/metrics must move after a real demo session (frames, step histograms, a busy refusal and a
bad parameter counted by reason); stats messages (kind 0x08) must arrive about once a second
with the fields docs/protocol-stats.md documents; every bench/ script's smoke mode must run.
The smoke runs start together at the beginning of the module (they mostly wait on real-time
audio) and each test collects its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

import jmoshi_server.app as app_module
from jmoshi_server.checkpoint import CheckpointError
from jmoshi_server.client import chat_url, converse
from jmoshi_server.config import parse_config
from jmoshi_server.engine import FrameResult, StepTimings
from jmoshi_server.metrics import Metrics
from jmoshi_server.protocol import ErrorCode, Kind
from jmoshi_server.stats import SessionMeter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from benchlib import histogram_quantile, prom_values  # noqa: E402

STATS_KEYS = {
    "session_seconds",
    "window_seconds",
    "frames",
    "frames_in",
    "frames_out",
    "dropped_frames",
    "frame_ms",
    "step_ms",
    "realtime_factor",
    "realtime",
    "server_added_ms",
}
STAGES = ("encode", "lm", "decode", "total")

SMOKES = {
    "frame_loop": ["bench/frame_loop.py", "--smoke"],
    "vs_moshi_server": ["bench/vs_moshi_server.py", "--smoke"],
    "slow_model": ["bench/slow_model.py", "--smoke"],
    "soak_memory": ["bench/soak_memory.py", "--smoke"],
    "loop_wait": ["bench/loop_wait.py", "--smoke"],
    "gpu": ["bench/gpu.py", "--device", "cpu", "--tiny", "--frames", "5", "--skip", "1", "--closed-loop"],
}


@pytest.fixture(scope="module")
def smokes(demo_dir, tmp_path_factory):
    """Every bench script's smoke mode, started at once; ``smokes(name)`` -> (rc, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdout=open(out / f"{name}.out", "w"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
        )
        for name, args in SMOKES.items()
    }

    def result(name: str) -> tuple[int, str]:
        rc = procs[name].wait(timeout=150)
        return rc, (out / f"{name}.out").read_text()

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        return prom_values(await resp.text())


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# ---- a real session against a real demo server ----------------------------------------


async def test_metrics_and_stats_move_during_a_real_session(start_server, speech_pcm, smokes):
    server = start_server()
    pcm = speech_pcm[: 24000 * 4]
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, server.url)
        assert before["jmoshi_model_ready"] == 1.0
        for reason in ("normal", "busy", "bad_parameter", "session_limit", "not_ready", *map(str, ErrorCode)):
            assert f'jmoshi_sessions_total{{reason="{reason}"}}' in before

        session = asyncio.create_task(converse(chat_url(server.url), pcm, tail_seconds=0.5))
        await asyncio.sleep(1.5)
        busy = await converse(chat_url(server.url), pcm[:1920], tail_seconds=0)
        refused = await converse(chat_url(server.url, text_temperature="warm"), pcm[:1920], tail_seconds=0)
        result = await session
        await asyncio.sleep(0.5)
        after = await scrape(http, server.url)

    assert busy.error_codes == ["busy"] and refused.error_codes == ["bad_parameter"]
    assert result.errors == []
    assert delta(after, before, 'jmoshi_sessions_total{reason="normal"}') == 1
    assert delta(after, before, 'jmoshi_sessions_total{reason="busy"}') == 1
    assert delta(after, before, 'jmoshi_sessions_total{reason="bad_parameter"}') == 1
    assert delta(after, before, "jmoshi_session_duration_seconds_count") == 1
    assert after["jmoshi_sessions_active"] == 0

    frames_in = delta(after, before, "jmoshi_input_frames_total")
    frames_out = delta(after, before, "jmoshi_output_frames_total")
    dropped = delta(after, before, "jmoshi_input_frames_dropped_total")
    assert 40 <= frames_in <= 51, frames_in  # 4 s of 80 ms frames
    # Frames still queued when the client leaves are neither stepped nor dropped.
    assert 0.5 * frames_in <= frames_out + dropped <= frames_in
    steps = {s: delta(after, before, f'jmoshi_step_seconds_count{{stage="{s}"}}') for s in STAGES}
    assert len(set(steps.values())) == 1, steps  # every stage observed once per step
    assert frames_out <= steps["total"] <= frames_in - dropped
    for stage in STAGES:
        assert delta(after, before, f'jmoshi_step_seconds_sum{{stage="{stage}"}}') > 0
    added = delta(after, before, "jmoshi_server_added_latency_seconds_count")
    assert 0.9 * frames_out <= added <= frames_out
    assert histogram_quantile(after, "jmoshi_step_seconds", 0.5, 'stage="total"') > 0
    assert after["jmoshi_event_loop_lag_seconds_count"] > 0
    # GC pauses: the full collection before gc.freeze at start-up, young ones during the chat.
    assert before['jmoshi_gc_pause_seconds_count{generation="2"}'] >= 1
    assert delta(after, before, 'jmoshi_gc_pause_seconds_count{generation="0"}') > 0
    assert re.search(r"garbage collector: \d{5,} objects frozen", server.log_text())

    assert_stats_agree(result.stats, frames_in, frames_out, dropped)


def assert_stats_agree(stats: list[dict], frames_in: float, frames_out: float, dropped: float) -> None:
    """Stats: about once a second, documented fields, session totals that agree with /metrics."""
    assert 3 <= len(stats) <= 7, len(stats)
    for message in stats:
        assert set(message) == STATS_KEYS, set(message) ^ STATS_KEYS
    gaps = np.diff([s["session_seconds"] for s in stats])
    assert all(0.5 <= gap <= 2.5 for gap in gaps), gaps
    last = stats[-1]
    assert last["frame_ms"] == 80 and last["window_seconds"] == 2.0
    assert 0 < last["frames_in"] <= frames_in and last["frames_out"] <= frames_out
    assert last["dropped_frames"] <= dropped
    busy_stats = [s for s in stats if s["frames"] > 0]
    assert busy_stats, stats
    for message in busy_stats:
        for q in ("p50", "p95"):
            assert set(message["step_ms"][q]) == set(STAGES)
            assert message["step_ms"][q]["total"] > 0
        assert message["step_ms"]["p50"]["total"] <= message["step_ms"]["p95"]["total"]
        assert isinstance(message["realtime"], bool) and message["realtime_factor"] > 0
        assert message["realtime"] == (message["realtime_factor"] < 1)
    assert any(s["server_added_ms"] for s in busy_stats)


# ---- in-process apps: one registry each -------------------------------------------------


async def test_each_app_has_its_own_registry_and_counts_not_ready(demo_dir, monkeypatch):
    gate = threading.Event()

    def held_load(config):
        gate.wait(30)
        raise CheckpointError("test: never loads")

    monkeypatch.setattr(app_module, "load_model", held_load)
    config = parse_config(["--demo", "--demo-dir", str(demo_dir)], env={})
    servers = [TestServer(app_module.create_app(config)) for _ in range(2)]
    try:
        for server in servers:
            await server.start_server()
        async with aiohttp.ClientSession() as http:
            first, second = (str(server.make_url("")) for server in servers)
            async with http.ws_connect(first + "/api/chat") as ws:
                assert (await ws.receive(timeout=2)).data[0] == Kind.ERROR
            await asyncio.sleep(0.25)  # a couple of loop-lag samples
            one, two = await scrape(http, first), await scrape(http, second)
        assert one['jmoshi_sessions_total{reason="not_ready"}'] == 1
        assert two['jmoshi_sessions_total{reason="not_ready"}'] == 0
        assert one["jmoshi_model_ready"] == two["jmoshi_model_ready"] == 0
        assert one["jmoshi_event_loop_lag_seconds_count"] >= 1
        assert not any(key.startswith("jmoshi_gpu_") for key in one)  # CUDA only
    finally:
        gate.set()
        for server in servers:
            await server.close()


# ---- the session meter on its own ---------------------------------------------------------


def _result(steps: tuple[float, float, float], received: float, started: float, finished: float):
    pcm = np.zeros(1920, np.float32)
    return FrameResult(
        pcm, 3, StepTimings(*steps), received_at=received, started_at=started, finished_at=finished
    )


def test_meter_window_percentiles_realtime_and_server_added():
    metrics = Metrics()
    ticks = iter(100.0 + 0.125 * i for i in range(1000))  # a result every 125 ms (exact in binary)
    meter = SessionMeter(metrics, clock=lambda: next(ticks))
    meter.started()
    for i in range(20):  # 20 frames of 10 + 20 + 10 ms (40 ms: real time), 2 ms added each
        meter.queued(dropped=1 if i == 5 else 0)
        meter.handled(_result((10, 20, 10), 50.0, 50.001, 50.041), sent_at=50.042)
    snap = meter.snapshot(now=meter._recent[-1].at)
    assert snap["frames"] == 17  # the last 2 s only
    assert snap["frames_in"] == 20 and snap["frames_out"] == 20
    assert snap["dropped_frames"] == 1
    assert snap["step_ms"]["p50"] == {"encode": 10, "lm": 20, "decode": 10, "total": 40}
    assert snap["realtime_factor"] == 0.5 and snap["realtime"] is True
    assert snap["server_added_ms"]["p50"] == pytest.approx(2.0, abs=0.01)
    # Slower than real time: 120 ms per frame.
    for _ in range(30):
        meter.handled(_result((20, 90, 10), 60.0, 60.0, 60.12), sent_at=None)
    snap = meter.snapshot(now=meter._recent[-1].at)
    assert snap["frames"] == 17
    assert snap["realtime"] is False and snap["realtime_factor"] == 1.5
    assert snap["step_ms"]["p95"]["lm"] == 90
    assert snap["server_added_ms"] is None  # no audio went out in the window
    meter.ended(None, 4.0)
    values = prom_values(generate_latest(metrics.registry).decode())
    assert values["jmoshi_input_frames_total"] == 20 and values["jmoshi_input_frames_dropped_total"] == 1
    assert values['jmoshi_step_seconds_count{stage="lm"}'] == 50
    assert values["jmoshi_server_added_latency_seconds_count"] == 20
    assert values['jmoshi_sessions_total{reason="normal"}'] == 1
    assert values["jmoshi_sessions_active"] == 0


def test_meter_before_any_frame():
    meter = SessionMeter(None)
    snap = meter.snapshot()
    assert set(snap) == STATS_KEYS
    assert snap["frames"] == 0 and snap["step_ms"] is None and snap["realtime"] is None


# ---- the benchmark scripts' smoke modes ---------------------------------------------------


def test_frame_loop_smoke(smokes):
    rc, out = smokes("frame_loop")
    assert rc == 0, out
    assert "| encode |" in out and "real-time factor" in out
    summary = last_json(out)
    assert all(v["frames"] > 0 and v["lm_p50"] > 0 and v["rtf"] > 0 for v in summary.values()), summary


def test_vs_moshi_server_smoke(smokes):
    rc, out = smokes("vs_moshi_server")
    assert rc == 0, out
    summary = last_json(out)
    assert set(summary) == {"jmoshi", "moshi.server"}
    for name, s in summary.items():
        assert s["errors"] == [] and s["first_audio_ms"] > 0 and s["get_p99_ms"] > 0, (name, s)
    assert summary["jmoshi"]["out_in_ratio"] > 0  # how much depends on the load: no timing asserts
    assert summary["jmoshi"]["server_added_p99_ms"] is not None


def test_loop_wait_smoke(smokes):
    rc, out = smokes("loop_wait")
    assert rc == 0, out
    summary = last_json(out)
    assert {"5ms", "0.5ms"} <= set(summary)
    for name in ("5ms", "0.5ms"):
        assert summary[name]["late_p99_ms"] >= 0 and summary[name]["handoff_p99_ms"] > 0
    # Freezing takes the model's objects out of a full collection: it must get cheaper.
    assert summary["gc_full_ms"]["frozen"] < summary["gc_full_ms"]["before"]


def test_slow_model_smoke_counts_and_reports_drops(smokes):
    rc, out = smokes("slow_model")
    assert rc == 0, out
    budget = last_json(out)["budget"]
    assert budget["realtime"] == [False]
    assert budget["dropped_stats"] > 0
    assert budget["dropped_metric"] >= budget["dropped_stats"]
    assert budget["stepped"] + budget["dropped_metric"] <= budget["frames_in"]


def test_soak_memory_smoke(smokes):
    rc, out = smokes("soak_memory")
    assert rc == 0, out
    summary = last_json(out)
    assert summary["errors"] == [] and summary["series_mb"] and summary["fds"][0] > 0


def test_gpu_bench_cpu_smoke(smokes):
    rc, out = smokes("gpu")
    assert rc == 0, out
    summary = last_json(out)
    assert set(summary) == {"graphs", "no-graphs"}
    assert all(v["frames"] == 4 and v["total_p50"] > 0 for v in summary.values())
