"""Many GPUs behind HAProxy (issue 8), for real: three demo servers, Debian's haproxy, the page.

The HAProxy configuration is the shipped one: deploy/generate.py renders it for three servers on
this test's ports, with the certificate from deploy/make_cert.py and deploy/wait-for-gpu.lua;
everything else (maxconn, the wait, health-check timings, timeouts) is what compose runs.
Measurements go to test-artifacts/lb-numbers.json (quoted in docs/multi-gpu.md).

The last test kills a server: keep it last.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import REPO, ServerProcess, free_port, stop_process
from deploy_files import DEPLOY, haproxy_path, load_generator
from page_browser import DESKTOP, PageUnderTest, launch

from jmoshi_server.client import FRAME_SAMPLES, SAMPLE_RATE, chat_url, converse, ogg_pages
from jmoshi_server.protocol import Kind

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - a broken dev environment, not a skip
    sync_playwright = None

ARTIFACTS = REPO / "test-artifacts"
GPUS = 3
# A generous input budget: a busy CI machine delays audio rather than dropping it.
SERVER_ARGS = ("--input-budget-ms", "1500")
NUMBERS: dict[str, Any] = {}


generate = load_generator()


def unchecked_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def record(**numbers: Any) -> None:
    NUMBERS.update(numbers)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "lb-numbers.json").write_text(json.dumps(NUMBERS, indent=2, sort_keys=True) + "\n")


class Balancer:
    """haproxy with the shipped configuration, rendered for servers on local ports."""

    def __init__(self, servers: dict[str, ServerProcess], workdir: Path) -> None:
        self.servers = servers
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert = workdir / "haproxy.pem"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JMOSHI_DATA_DIR": str(workdir / "data"),
            "JMOSHI_PUBLIC_HOSTS": "",
        }
        made = subprocess.run(
            [sys.executable, str(DEPLOY / "make_cert.py"), "--out", str(self.cert), "--port", str(self.port)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            generate.render_haproxy(
                [(name, f"127.0.0.1:{server.port}") for name, server in servers.items()],
                bind=f"127.0.0.1:{self.port}",
                cert=str(self.cert),
                lua=str(DEPLOY / "wait-for-gpu.lua"),
            )
        )
        self.loading: dict | None = None
        self.log_path = workdir / "haproxy.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [haproxy_path(), "-db", "-f", str(self.config)], stdout=self._log, stderr=subprocess.STDOUT
        )

    def watch_loading(self, timeout: float = 60.0) -> dict | None:
        """While the servers load: what /readyz and a new conversation get through HAProxy
        (None if they were ready before HAProxy could answer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                status, body = self.get("/readyz")
            except OSError:
                status, body = 0, b""
            if status == 200:
                return None
            if status == 503 and body.startswith(b"{"):
                chat = asyncio.run(
                    converse(self.chat, np.zeros(FRAME_SAMPLES, np.float32), ssl_context=False)
                )
                return {"readyz": json.loads(body), "chat_errors": chat.error_codes, "close": chat.close_code}
            time.sleep(0.1)
        raise TimeoutError(f"no answer through haproxy after {timeout} s:\n{self.log_text()}")

    def wait_all_up(self, timeout: float = 30.0) -> None:
        """Until HAProxy counts every server as up: after one full check cycle (a server may be
        marked down by checks made while it loaded), the last state change of each is UP."""
        time.sleep(2.5)
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            text = self.log_text()
            down = [
                name
                for name in self.servers
                if text.rfind(f"Server chat/{name} is DOWN") > text.rfind(f"Server chat/{name} is UP")
            ]
            if not down:
                return
            assert time.monotonic() < deadline, f"{down} still down:\n{text}"
            time.sleep(0.2)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_text()}")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5, context=unchecked_tls()) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @property
    def chat(self) -> str:
        return chat_url(self.url)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, self._log, timeout=10)


def wait_listening(server: ServerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_text()}")
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"server not listening after {timeout} s"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def lb(start_server, tmp_path_factory: pytest.TempPathFactory):
    haproxy_path()
    servers = {generate.service_name(i): start_server(*SERVER_ARGS, wait=False) for i in range(GPUS)}
    # HAProxy starts while the servers still load their models, as after `docker compose up`:
    # once they listen (HAProxy counts servers as up until checks say otherwise), not ready.
    for server in servers.values():
        wait_listening(server)
    balancer = Balancer(servers, tmp_path_factory.mktemp("lb"))
    balancer.loading = balancer.watch_loading()
    for server in servers.values():
        server.wait_ready()
    balancer.wait_all_up()
    yield balancer
    balancer.stop()


# ---- one person, under the test's control ---------------------------------------------------


class Talker:
    """A conversation through the balancer: talks for a moment, then holds its GPU quietly."""

    def __init__(self, url: str, speech: np.ndarray) -> None:
        self.url = url
        self.speech = speech
        self.jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1 (an IP)
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.handshake = asyncio.Event()
        self.handshake_seconds: float | None = None
        self.audio_messages = 0
        self.errors: list[dict] = []
        self.closed_at: float | None = None
        self._tasks: list[asyncio.Task] = []

    async def open(self, talk_seconds: float = 1.0, timeout: float = 15.0) -> Talker:
        self.session = aiohttp.ClientSession(cookie_jar=self.jar)
        started = time.monotonic()
        self.ws = await self.session.ws_connect(self.url, ssl=False, max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._receive()))
        await asyncio.wait_for(self.handshake.wait(), timeout)
        self.handshake_seconds = time.monotonic() - started
        self._tasks.append(asyncio.create_task(self._talk(talk_seconds)))
        return self

    async def _receive(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                continue
            kind = msg.data[0]
            if kind == Kind.HANDSHAKE:
                self.handshake.set()
            elif kind == Kind.AUDIO:
                self.audio_messages += 1
            elif kind == Kind.ERROR:
                self.errors.append(json.loads(msg.data[1:]))
        self.closed_at = time.monotonic()

    async def _talk(self, seconds: float) -> None:
        assert self.ws is not None
        pages = ogg_pages(self.speech[: int(seconds * SAMPLE_RATE)])
        start = time.monotonic()
        for index, page in enumerate(pages):
            if self.ws.closed:
                return
            if page:
                await self.ws.send_bytes(bytes((Kind.AUDIO,)) + page)
            await asyncio.sleep(
                max(0.0, start + (index + 1) * FRAME_SAMPLES / SAMPLE_RATE - time.monotonic())
            )

    @property
    def gpu(self) -> str | None:
        """The GPU server HAProxy chose, from the cookie it sets for the page's /api/status."""
        return next((cookie.value for cookie in self.jar if cookie.key == "jmoshi_gpu"), None)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code if self.ws else None

    async def wait_audio(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.audio_messages == 0:
            assert time.monotonic() < deadline, f"no audio back from {self.gpu} within {timeout} s"
            await asyncio.sleep(0.05)

    async def wait_closed(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._tasks[0], timeout)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


async def talkers(lb: Balancer, speech: np.ndarray, count: int) -> list[Talker]:
    people = [Talker(lb.chat, speech) for _ in range(count)]
    await asyncio.gather(*(person.open() for person in people))
    return people


async def close_all(people: list[Talker]) -> None:
    await asyncio.gather(*(person.close() for person in people))


async def busy_attempt(lb: Balancer, speech: np.ndarray) -> tuple[float, Any]:
    started = time.monotonic()
    result = await converse(lb.chat, speech[:SAMPLE_RATE], ssl_context=False, tail_seconds=0.2)
    return time.monotonic() - started, result


def wait_for_log(lb: Balancer, text: str, timeout: float, after: int = 0) -> float:
    """Seconds until ``text`` appears in the haproxy log beyond its first ``after`` characters."""
    started = time.monotonic()
    while text not in lb.log_text()[after:]:
        assert time.monotonic() - started < timeout, f"{text!r} not in the haproxy log:\n{lb.log_text()}"
        time.sleep(0.05)
    return time.monotonic() - started


# ---- tests ----------------------------------------------------------------------------------


async def test_lb_three_talk_a_fourth_is_busy_a_fifth_waits_for_a_free_gpu(lb, speech_pcm):
    people = await talkers(lb, speech_pcm, GPUS)
    try:
        gpus = [person.gpu for person in people]
        assert None not in gpus, "HAProxy sets the jmoshi_gpu cookie on each conversation"
        assert sorted(gpus) == sorted(lb.servers), f"one conversation per GPU: {gpus}"
        await asyncio.gather(*(person.wait_audio() for person in people))
        assert not any(person.errors for person in people)

        # A fourth person while all three talk: the wait, then the protocol's busy answer.
        waited, fourth = await busy_attempt(lb, speech_pcm)
        assert fourth.error_codes == ["busy"], fourth.errors
        assert fourth.close_code == 1013 and fourth.handshake_seconds is None
        assert fourth.errors[0]["session_seconds"] > 0 and fourth.errors[0]["message"]
        assert generate.WAIT_SECONDS - 0.3 <= waited <= generate.WAIT_SECONDS + 3, waited
        record(full_busy_after_seconds=round(waited, 2), full_busy_error=fourth.errors[0])

        # A fifth arrives, and one of the three stops a second later: the fifth gets that GPU.
        fifth = Talker(lb.chat, speech_pcm)
        opening = asyncio.create_task(fifth.open())
        await asyncio.sleep(1.0)
        leaving = people.pop(0)
        await leaving.close()
        await opening
        people.append(fifth)
        assert 0.8 <= fifth.handshake_seconds <= generate.WAIT_SECONDS + 1, fifth.handshake_seconds
        assert fifth.gpu == leaving.gpu
        await fifth.wait_audio()
        record(waited_for_a_freed_gpu_seconds=round(fifth.handshake_seconds, 2))

        # One closes; the next person gets straight through to that GPU.
        leaving = people.pop(0)
        await leaving.close()
        await asyncio.sleep(0.2)
        sixth = await Talker(lb.chat, speech_pcm).open()
        people.append(sixth)
        assert sixth.handshake_seconds < 2.0 and sixth.gpu == leaving.gpu
        await sixth.wait_audio()
    finally:
        await close_all(people)


async def test_lb_the_pages_same_origin_socket_is_accepted_other_origins_refused(lb):
    status, body = lb.get("/")
    assert status == 200 and b"<html" in body.lower()
    status, body = lb.get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    host = f"127.0.0.1:{lb.port}"
    async with aiohttp.ClientSession() as session:
        # The page's own origin, by IP and by name (Host and Origin pass through unchanged).
        for origin, url in ((f"https://{host}", lb.chat), (f"https://localhost:{lb.port}", None)):
            target = url or chat_url(f"https://localhost:{lb.port}")
            async with session.ws_connect(target, ssl=False, headers={"Origin": origin}) as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == Kind.HANDSHAKE, origin
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(lb.chat, ssl=False, headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403


def test_lb_while_the_models_load_the_page_is_told_why(lb):
    """Right after start-up no GPU is ready: /readyz through HAProxy is a loading server's own
    answer (the page shows its reason, e.g. the first download), and a conversation gets the
    protocol's not_ready, not an HTTP error from HAProxy."""
    assert lb.loading is not None, "the servers were ready before HAProxy answered: nothing seen"
    record(while_loading=lb.loading)
    readyz = lb.loading["readyz"]
    assert readyz["ready"] is False and readyz["phase"] in ("loading", "warming_up") and readyz["reason"]
    assert lb.loading["chat_errors"] == ["not_ready"] and lb.loading["close"] == 1013


async def test_lb_status_polls_reach_the_gpu_of_the_conversation(lb, speech_pcm):
    """The page polls /api/status while talking: with HAProxy's cookie it sees its own server."""
    (person,) = await talkers(lb, speech_pcm, 1)
    try:
        assert person.gpu in lb.servers
        async with aiohttp.ClientSession(cookie_jar=person.jar) as session:
            for _ in range(2 * GPUS):
                async with session.get(lb.url + "/api/status", ssl=False) as response:
                    assert (await response.json())["busy"] is True
        async with aiohttp.ClientSession() as stranger:  # no cookie: any server
            seen = []
            for _ in range(2 * GPUS):
                async with stranger.get(lb.url + "/api/status", ssl=False) as response:
                    seen.append((await response.json())["busy"])
            assert False in seen
    finally:
        await person.close()


async def test_lb_time_to_route(lb, speech_pcm):
    """Connect -> handshake through HAProxy (TLS, routing) against the same servers directly."""
    one_frame = speech_pcm[:FRAME_SAMPLES]

    async def handshakes(urls: list[str]) -> list[float]:
        times = []
        for url in urls:
            result = await converse(url, one_frame, ssl_context=False, tail_seconds=0.0)
            assert result.handshake_seconds is not None, result.errors
            times.append(result.handshake_seconds)
        return times

    rounds = 8
    direct = await handshakes([chat_url(s.url) for s in lb.servers.values()] * rounds)
    through = await handshakes([lb.chat] * (rounds * GPUS))
    direct_ms, through_ms = (round(statistics.median(t) * 1000, 1) for t in (direct, through))
    record(
        handshake_ms_direct_median=direct_ms,
        handshake_ms_through_haproxy_median=through_ms,
        handshake_ms_through_haproxy_max=round(max(through) * 1000, 1),
        handshakes_each=len(through),
    )
    # With a GPU free, nothing waits: the balancer adds a TLS handshake and a hop, not seconds.
    assert through_ms < direct_ms + 250, (direct_ms, through_ms)


class LoopThread:
    """An asyncio loop in a thread, for holding conversations while Playwright drives the page."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def mic_wav(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mic") / "speech48k.wav"
    subprocess.run(["sox", str(speech_wav), "-r", "48000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


def test_lb_page_shows_busy_then_talks_when_a_gpu_frees(lb, speech_pcm, mic_wav):
    """The unchanged page through HAProxy: everyone busy -> its busy screen; a GPU frees -> talking."""
    if sync_playwright is None:
        pytest.fail("playwright is missing: run `scripts/venv.sh dev` (and `bash scripts/setup-system.sh`)")
    background = LoopThread()
    people = background.run(talkers(lb, speech_pcm, GPUS))
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright, mic_wav)
            page = PageUnderTest(browser, lb.url + "/", ignore_https_errors=True, **DESKTOP)
            try:
                page.wait_state("ready")
                page.page.click("#start")
                page.wait_state("busy", timeout=generate.WAIT_SECONDS + 10)
                assert page.js("jmoshi.errors")[-1]["code"] == "busy"
                assert "ほかの人が J-Moshi と話しています" in page.status_text()
                page.screenshot("lb-page-busy-ja.png")

                background.run(people.pop(0).close())
                page.page.click("#retry")
                page.wait_state("talking", timeout=20)
                page.wait_for(lambda: page.js("jmoshi.counters.audioMessages") > 0, "audio through HAProxy")
                # The browser kept HAProxy's cookie from the WebSocket handshake, so the page's
                # /api/status polls reach the server it talks to, not a free one.
                cookies = {c["name"]: c["value"] for c in page.context.cookies()}
                assert cookies.get("jmoshi_gpu") in lb.servers, cookies
                background.run(people.pop(0).close())
                poll = "fetch('api/status').then((r) => r.json()).then((body) => body.busy)"
                assert all(page.js(poll) for _ in range(2 * GPUS))
                page.page.click("#stop")
                page.wait_state("stopped")
                assert not page.errors, page.errors
            finally:
                page.close()
                browser.close()
    finally:
        background.run(close_all(people))
        background.stop()


async def test_lb_a_killed_gpu_server_is_taken_out_and_its_user_told(lb, speech_pcm):
    """Kill the server under one conversation: its socket drops at once, health checks take the
    server out, and new conversations go to the others. Runs last: it leaves one server dead."""
    people = await talkers(lb, speech_pcm, GPUS)
    try:
        victim = people[0]
        killed = victim.gpu
        assert killed in lb.servers
        await victim.wait_audio()
        log_mark = len(lb.log_text())
        lb.servers[killed].proc.kill()
        t_kill = time.monotonic()
        await victim.wait_closed(timeout=10)
        noticed = victim.closed_at - t_kill
        # What the page sees: the socket closes with no error message (1006, abnormal closure),
        # which its "connection lost" state handles by reconnecting after /readyz.
        assert victim.close_code == 1006 and victim.errors == [], (victim.close_code, victim.errors)
        down = await asyncio.to_thread(wait_for_log, lb, f"Server chat/{killed} is DOWN", 10, log_mark)
        record(killed_user_notices_seconds=round(noticed, 3), killed_server_down_after_seconds=round(down, 2))
        assert lb.get("/readyz")[0] == 200

        # One of the two others stops: the next person goes to its GPU, not to the dead one...
        leaving = people[1]
        await leaving.close()
        newcomer = await Talker(lb.chat, speech_pcm).open()
        people.append(newcomer)
        assert newcomer.gpu == leaving.gpu
        await newcomer.wait_audio()
        # ...and with the two live GPUs talking, the next is told busy (not sent to the dead one).
        waited, extra = await busy_attempt(lb, speech_pcm)
        assert extra.error_codes == ["busy"], (extra.errors, extra.close_code)
        assert waited <= generate.WAIT_SECONDS + 3
    finally:
        await close_all(people)
