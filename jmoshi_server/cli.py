"""``jmoshi-server``: parse the config, bind, load the model in the background, serve."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import warnings
from collections.abc import Sequence

from aiohttp import web

from .app import STATE, create_app
from .checkpoint import CheckpointError
from .config import Config, parse_config
from .quietlog import quiet_client_errors

log = logging.getLogger("jmoshi_server")

EXIT_MODEL_ERROR = 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_client_errors()  # a malformed request is one line, not a traceback
    logging.captureWarnings(True)
    # moshi warns that a repo without config.json is assumed to be Moshi 7B: that is J-Moshi.
    warnings.filterwarnings("ignore", message=".*contains no config.json.*")


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (is another server running?)", config.host, config.port, exc)
        await runner.cleanup()
        return 1
    log.info("listening on http://%s:%d", config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    stopper = asyncio.create_task(stop.wait())
    assert state.loader is not None
    done, _ = await asyncio.wait({stopper, state.loader}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if state.loader in done and state.loader.exception() is not None:
        exc = state.loader.exception()
        if isinstance(exc, CheckpointError):
            log.error("cannot load the model: %s", exc)
        else:
            log.error("cannot load the model", exc_info=exc)
        code = EXIT_MODEL_ERROR
    else:
        await stop.wait()
        log.info("shutting down")
    stopper.cancel()
    await runner.cleanup()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config.log_level)
    return asyncio.run(serve(config))
