"""Process-wide latency settings: CPU split and GC freeze (runtime.py)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from jmoshi_server import runtime
from jmoshi_server.config import parse_config


def test_split_gives_the_loop_the_lowest_cpu_and_the_model_the_rest():
    split = runtime.plan_split({5, 2, 3, 4})
    assert split is not None
    assert split.loop == {2} and split.model == {3, 4, 5}
    assert split.describe() == "event loop on CPU 2, model on CPU 3-5"
    assert runtime.plan_split({0, 2}).describe() == "event loop on CPU 0, model on CPU 2"
    assert runtime._cpu_list(frozenset({0, 1, 2, 3, 6, 8, 9})) == "0-3,6,8-9"  # as /proc writes it


def test_no_split_below_two_cpus():
    assert runtime.plan_split({7}) is None
    assert runtime.plan_split(set()) is None


def test_latency_settings_defaults_flags_and_env():
    config = parse_config([], env={})
    assert config.gc_freeze is True and config.cpu_split is False
    config = parse_config(["--no-gc-freeze", "--cpu-split"], env={})
    assert config.gc_freeze is False and config.cpu_split is True
    config = parse_config([], env={"JMOSHI_GC_FREEZE": "0", "JMOSHI_CPU_SPLIT": "1"})
    assert config.gc_freeze is False and config.cpu_split is True


def _thread_cpus(pid: int) -> list[str]:
    """Each thread's allowed CPU list, from /proc."""
    lists = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.append(line.split(":", 1)[1].strip())
    return lists


def _allowed_list() -> str:
    return runtime._cpu_list(frozenset(os.sched_getaffinity(0)))


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2 or not Path("/proc").is_dir(),
    reason="needs Linux with two CPUs",
)
def test_cpu_split_pins_the_loop_and_the_model_thread_apart(start_server):
    split = runtime.plan_split()
    assert split is not None
    server = start_server("--cpu-split")
    cpus = _thread_cpus(server.proc.pid)
    loop, model = runtime._cpu_list(split.loop), runtime._cpu_list(split.model)
    assert loop in cpus, cpus  # the main thread, and threads it started later
    assert model in cpus, cpus  # the model thread and torch's threads
    assert f"CPUs: {split.describe()}" in server.log_text()


def test_without_cpu_split_no_thread_is_pinned(server):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    assert set(_thread_cpus(server.proc.pid)) == {_allowed_list()}


def test_gc_pause_timer_reports_each_collection_while_installed():
    pauses: list[tuple[int, float]] = []
    with runtime.GcPauseTimer(lambda generation, seconds: pauses.append((generation, seconds))):
        gc.collect()
    assert pauses and pauses[-1][0] == 2 and pauses[-1][1] >= 0
    seen = len(pauses)
    gc.collect()
    assert len(pauses) == seen  # removed from gc.callbacks on exit
