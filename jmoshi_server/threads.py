"""``asyncio.to_thread``, but on a daemon thread that process exit does not wait for.

asyncio.run and the interpreter join the default executor's threads at exit. For work that can
take arbitrarily long (a 16 GB first download, a write to a disk that has stopped answering)
that turns SIGTERM into a hang that ends only in SIGKILL. Awaiting this is the same as awaiting
``to_thread``: the result, or the function's exception re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


async def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str = "jmoshi-io") -> Any:
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised in the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
