"""``jmoshi-server``: parse the config, bind, load the model in the background, serve."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from . import runtime, tls
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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def announce(config: Config, https: tls.TlsSetup | None) -> None:
    """Tell the person running the server what to open, and what to expect there."""
    scheme = "https" if https else "http"
    urls = [f"{scheme}://{_url_host(host)}:{config.port}/" for host in tls.advertised_hosts(config)]
    log.info("listening on %s:%d (%s); open: %s", config.host, config.port, scheme, "  ".join(urls))
    if https:
        origin = "generated, self-signed" if https.generated else "kept from an earlier start"
        if config.tls_cert:
            origin = "from --tls-cert"
        log.info("certificate %s (%s), names: %s", https.cert_path, origin, ", ".join(https.names))
        log.info("certificate SHA-256 fingerprint: %s", https.fingerprint)
        if not config.tls_cert:
            log.info(
                "browsers warn about a self-signed certificate once per device: check the fingerprint, "
                "then choose Advanced -> Proceed (Chrome) or Show Details -> visit this website (Safari)"
            )
            if Path("/.dockerenv").exists() and not config.public_host_list:
                log.warning(
                    "running in a container: set JMOSHI_PUBLIC_HOSTS to this machine's LAN address "
                    "(e.g. 192.168.1.20) so the certificate and these URLs name it"
                )
    elif not tls.is_loopback(config.host):
        log.warning(
            "serving plain http on %s: browsers give the microphone only to https pages, so this "
            "works only behind a TLS proxy (or with --tls auto/on)",
            config.host,
        )
    if config.token:
        log.info("a token is required; this link carries it: %s?token=%s", urls[0], quote(config.token))
    elif not tls.is_loopback(config.host):
        log.warning("no --token: anyone who can reach port %d can use the model", config.port)


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    try:
        https = tls.setup(config)
    except tls.TlsError as exc:
        log.error("cannot serve HTTPS: %s", exc)
        return 1
    app = create_app(config, cpu_split=_split_cpus(config))
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=https.context if https else None)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (is another server running?)", config.host, config.port, exc)
        await runner.cleanup()
        return 1
    announce(config, https)
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


def _split_cpus(config: Config) -> runtime.CpuSplit | None:
    """--cpu-split: pin this (the event loop's) thread; the model thread pins itself."""
    split = runtime.plan_split() if config.cpu_split else None
    if split is None or not runtime.pin_this_thread(split.loop):
        return None
    log.info("CPUs: %s", split.describe())
    return split


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config.log_level)
    return asyncio.run(serve(config))
