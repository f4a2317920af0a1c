"""Process-wide settings that decide how long the event loop waits behind the model thread.

The model thread and the event loop share one interpreter and one machine, so two things
outside our code decide how soon the loop (sends, GETs, Opus) runs while the model steps
(bench/loop_wait.py measures both; docs/benchmarks.md has the figures):

- The garbage collector. torch, moshi and the loaded model are ~260 000 long-lived objects;
  every full collection walks them all while holding the GIL (~100-230 ms). They are frozen
  once the model is warm (``--gc-freeze``).
- CPU placement (opt-in ``--cpu-split``, Linux). With the loop and the model on the same
  CPU the loop waits for a time slice before it can even ask for the GIL. Pinning the loop
  to one CPU and the model (whose torch threads inherit its mask) to the others removes
  that, at the cost of the loop never using the model's CPUs when they are idle.

Python's GIL switch interval was measured too (5 ms default against 0.5 ms) and made no
difference with this model thread, so it is left alone.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def freeze_garbage_collector() -> None:
    """Collect once, then exempt every object alive now from later collections.

    Called after warm-up and before the model takes sessions: the collection itself holds
    the GIL for a few hundred ms, which nobody should be talking through.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "garbage collector: %d objects frozen after a %.0f ms collection",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )


class GcPauseTimer:
    """A ``gc.callbacks`` hook, used as a context manager: ``on_pause(generation, seconds)``
    after every collection (each holds the GIL, so every thread waits that long)."""

    def __init__(self, on_pause: Callable[[int, float], None]) -> None:
        self.on_pause = on_pause
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.on_pause(info["generation"], time.perf_counter() - self._started)

    def __enter__(self) -> GcPauseTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs the event loop keeps and which the model thread may use."""

    loop: frozenset[int]
    model: frozenset[int]

    def describe(self) -> str:
        return f"event loop on CPU {_cpu_list(self.loop)}, model on CPU {_cpu_list(self.model)}"


def plan_split(allowed: set[int] | None = None) -> CpuSplit | None:
    """The lowest allowed CPU for the loop, the rest for the model; None below two CPUs."""
    if allowed is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    ordered = sorted(allowed)
    return CpuSplit(loop=frozenset(ordered[:1]), model=frozenset(ordered[1:]))


def pin_this_thread(cpus: frozenset[int]) -> bool:
    """Restrict the calling thread (and threads it starts later) to ``cpus``; False if refused."""
    try:
        os.sched_setaffinity(0, cpus)  # pid 0: the calling thread, on Linux
    except (AttributeError, OSError) as exc:
        log.warning("could not pin a thread to CPU %s: %s", _cpu_list(cpus), exc)
        return False
    return True


def _cpu_list(cpus: frozenset[int]) -> str:
    """CPUs as Linux writes them (``/proc/*/status``): ``0-3,6``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
