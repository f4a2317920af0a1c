"""HTTP endpoints: health, readiness while loading, status, the static page."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

import jmoshi_server.app as app_module
from jmoshi_server.config import parse_config
from jmoshi_server.engine import EngineSession
from jmoshi_server.protocol import Sampling


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_health_status_and_page(server):
    async with aiohttp.ClientSession() as http:
        assert await get_json(http, server.url + "/healthz") == (200, {"ok": True})
        assert await get_json(http, server.url + "/readyz") == (200, {"ready": True})
        code, status = await get_json(http, server.url + "/api/status")
        assert code == 200
        assert status["model"] == "demo" and status["device"] == "cpu" and status["dtype"] == "float32"
        assert status["phase"] == "ready" and status["busy"] is False
        for key in ("sessions_served", "frames_processed", "frames_dropped", "current_session_seconds"):
            assert key in status
        async with http.get(server.url + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "<html" in (await resp.text()).lower()


async def test_wasm_is_served_as_application_wasm(start_server, tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    (tmp_path / "codec.wasm").write_bytes(b"\0asm\x01\0\0\0")
    server = start_server("--static-dir", str(tmp_path))
    async with aiohttp.ClientSession() as http, http.get(server.url + "/codec.wasm") as resp:
        assert resp.status == 200 and resp.content_type == "application/wasm"


async def test_not_ready_while_the_model_loads(demo_dir, monkeypatch):
    """Until the model is loaded, /readyz says why and chat answers not_ready at once."""
    gate = threading.Event()
    real_load = app_module.load_model

    def held_load(config):
        gate.wait(30)  # the real loader, started late: the server is "loading" meanwhile
        return real_load(config)

    monkeypatch.setattr(app_module, "load_model", held_load)
    config = parse_config(["--demo", "--demo-dir", str(demo_dir)], env={})
    server = TestServer(app_module.create_app(config))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            base = str(server.make_url(""))
            assert (await get_json(http, base + "/healthz"))[0] == 200
            code, body = await get_json(http, base + "/readyz")
            assert code == 503 and body["phase"] == "loading" and "loading" in body["reason"]
            async with http.ws_connect(base + "/api/chat") as ws:
                msg = await ws.receive(timeout=2)
                assert msg.data[0] == 0x05 and json.loads(msg.data[1:])["code"] == "not_ready"
                closing = await ws.receive(timeout=2)
                assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1013
            gate.set()
            for _ in range(200):
                code, body = await get_json(http, base + "/readyz")
                if code == 200:
                    break
                await asyncio.sleep(0.05)
            assert code == 200
    finally:
        gate.set()
        await server.close()


@pytest.mark.parametrize(("pushed", "budget", "kept"), [(2, 3, 2), (10, 3, 3), (5, 1, 1)])
async def test_input_queue_keeps_the_newest_frames_within_budget(pushed, budget, kept):
    sampling = Sampling(0.7, 25, 0.8, 250, None)
    session = EngineSession(sampling, 0, budget, asyncio.get_running_loop(), lambda _: None)
    frames = [np.full(1920, i, np.float32) for i in range(pushed)]
    dropped = sum(session.push(f) for f in frames)
    assert dropped == pushed - kept == session.dropped_frames
    assert [int(session._next_frame()[0]) for _ in range(kept)] == list(range(pushed - kept, pushed))
    session.close()
    assert session._next_frame() is None and session.push(frames[0]) == 0
