"""``asyncio.to_thread``, but on a daemon thread that process exit does not wait for.

asyncio.run and the interpreter join the default executor's threads at exit. For work that can
take arbitrarily long (a 16 GB first download, a write to a disk that has stopped answering)
that turns SIGTERM into a hang that ends only in SIGKILL. Awaiting this is the same as awaiting
``to_thread``: the result, or the function's exception re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any


async def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str = "jmoshi-io") -> Any:
    """Await ``fn(*args)`` run on a fresh daemon thread, which never holds up the process's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    threading.Thread(target=_call, args=(fn, args, loop, future), name=name, daemon=True).start()
    return await future


def _call(
    fn: Callable[..., Any], args: tuple, loop: asyncio.AbstractEventLoop, future: asyncio.Future
) -> None:
    """On a worker thread: run ``fn`` and hand its result or exception to ``future``'s loop."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised in the awaiting task
        error = exc
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
        loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DaemonWorker:
    """One long-lived daemon thread that runs blocking calls in order.

    For frequent small jobs (a recording's flush every 0.5 s): a new thread per job makes glibc
    hand out fresh malloc arenas and the process's RSS creep up (measured: about 60 KB per
    recorded session); one thread keeps to one arena. Started on first use.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put((fn, args, loop, future))
        return await future

    def _work(self) -> None:
        while True:
            _call(*self._jobs.get())
