"""Session limits: --max-session-seconds and --idle-seconds end a session with a typed error."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest

from jmoshi_server.client import chat_url, converse, ogg_pages
from jmoshi_server.config import parse_config
from jmoshi_server.protocol import Kind

MAX_SESSION_S = 4
IDLE_S = 1
TALK_S = 1.6  # the idle test talks this long first: longer than IDLE_S, well short of the limit


@pytest.fixture(scope="module")
def limited(start_server):
    return start_server("--max-session-seconds", str(MAX_SESSION_S), "--idle-seconds", str(IDLE_S))


async def test_session_limit_ends_a_long_session(limited, speech_pcm: np.ndarray) -> None:
    """Talking the whole time (so never idle), the session still ends at the limit."""
    pcm = np.concatenate([speech_pcm] * 2)[: 24000 * (MAX_SESSION_S + 3)]
    started = time.monotonic()
    result = await converse(chat_url(limited.url), pcm, realtime=True, tail_seconds=0.5)
    elapsed = time.monotonic() - started
    assert result.handshake_seconds is not None
    assert result.error_codes == ["session_limit"], result.errors
    assert result.close_code == 1000
    assert MAX_SESSION_S <= elapsed < MAX_SESSION_S + 2.5
    assert result.metadata and result.metadata["max_session_seconds"] == MAX_SESSION_S


async def test_session_limit_idle_ends_a_silent_session(limited) -> None:
    """Connected, handshake, then no audio: ended after --idle-seconds, not at the session limit."""
    async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(limited.url)) as ws:
        first = await ws.receive(timeout=30)
        assert first.data[0] == Kind.HANDSHAKE, first.data
        handshake_at = time.monotonic()
        # Send audio for a while first: that must keep the session alive past IDLE_S.
        pages = [page for page in ogg_pages(np.zeros(24000 * 2, dtype=np.float32)) if page]
        for page in pages[: int(TALK_S / 0.08)]:
            await ws.send_bytes(bytes((Kind.AUDIO,)) + page)
            await asyncio.sleep(0.08)
        last_audio_at = time.monotonic()
        errors, metadata = [], None
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            if msg.data[0] == Kind.ERROR:
                errors.append(json.loads(msg.data[1:]))
            elif msg.data[0] == Kind.METADATA:
                metadata = json.loads(msg.data[1:])
        ended_at = time.monotonic()
        assert ws.close_code == 1000
    assert [e["code"] for e in errors] == ["idle_timeout"], errors
    assert metadata and metadata["idle_seconds"] == IDLE_S
    assert ended_at - handshake_at > TALK_S, "audio must keep the session alive"
    assert IDLE_S - 0.2 <= ended_at - last_audio_at < IDLE_S + 1.5
    assert "idle_timeout" in limited.log_text()


def test_session_limit_config() -> None:
    assert parse_config([], env={}).idle_seconds == 60
    assert parse_config([], env={"JMOSHI_IDLE_SECONDS": "0"}).idle_seconds == 0
    with pytest.raises(SystemExit):
        parse_config(["--idle-seconds", "-1"], env={})
