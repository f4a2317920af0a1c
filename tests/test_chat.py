"""End to end over a real port: real Opus, real WebSocket, the demo model stepping for real."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import numpy as np
import pytest

from jmoshi_server.client import chat_url, converse, ogg_pages

SAMPLE_RATE = 24_000


def status(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url + "/api/status", timeout=5) as resp:
        return json.loads(resp.read())


async def wait_free(server, timeout: float = 10.0) -> None:
    """The model lock must come back quickly after any session ends."""
    deadline = time.monotonic() + timeout
    while status(server)["busy"]:
        assert time.monotonic() < deadline, "the model stayed busy after the session ended"
        await asyncio.sleep(0.05)


async def open_session(ws_session: aiohttp.ClientSession, url: str, **kw) -> aiohttp.ClientWebSocketResponse:
    """Connect and wait for the handshake and metadata."""
    ws = await ws_session.ws_connect(url, **kw)
    first = await ws.receive(timeout=10)
    assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00", first
    meta = await ws.receive(timeout=10)
    assert meta.data[0] == 0x04
    return ws


async def next_error(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict:
    """Skip audio/text until a 0x05 error arrives."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"no error message before {msg.type} {msg.data!r}")
        if msg.data[:1] == b"\x05":
            return json.loads(msg.data[1:])


async def test_japanese_speech_round_trip(server, speech_pcm):
    result = await converse(chat_url(server.url), speech_pcm, tail_seconds=1.5)
    assert result.errors == []
    assert result.handshake_seconds is not None and result.handshake_seconds < 5
    seconds_in = len(speech_pcm) / SAMPLE_RATE
    seconds_out = len(result.audio) / SAMPLE_RATE
    assert seconds_in >= 5
    assert seconds_out / seconds_in >= 0.9, (seconds_in, seconds_out)
    assert np.isfinite(result.audio).all() and np.abs(result.audio).max() > 0
    # Text: some characters, all valid, none of moshi.server's artefacts.
    assert len(result.text) > 0
    assert "<0x" not in result.text and "\ufffd" not in result.text
    assert "▁" not in result.text and " " not in result.text
    meta = result.metadata
    assert meta["model"] == "demo" and meta["sample_rate"] == 24000 and meta["frame_rate"] == 12.5
    assert meta["max_session_seconds"] == 600
    assert set(meta["sampling"]) == {
        "text_temperature",
        "text_topk",
        "audio_temperature",
        "audio_topk",
        "seed",
    }
    await wait_free(server)


async def test_sampling_parameters_are_honoured(server, speech_pcm):
    url = chat_url(server.url, text_temperature=0, text_topk=5, audio_temperature=0.5, audio_topk=10, seed=42)
    short = speech_pcm[: SAMPLE_RATE * 2]
    # Real time, so no input is dropped and both runs see exactly the same frames.
    first = await converse(url, short, tail_seconds=0.5)
    assert first.metadata["sampling"] == {
        "text_temperature": 0.0,
        "text_topk": 5,
        "audio_temperature": 0.5,
        "audio_topk": 10,
        "seed": 42,
    }
    await wait_free(server)
    # Same seed, same input, greedy text: the same words again.
    second = await converse(url, short, tail_seconds=0.5)
    assert second.text == first.text
    await wait_free(server)


@pytest.mark.parametrize(
    "query",
    [
        {"text_temperature": "hot"},
        {"text_topk": "0"},
        {"audio_temperature": "nan"},
        {"audio_topk": "1.5"},
        {"seed": "-1"},
        {"text_temperature": "1e9"},
    ],
)
async def test_bad_parameter_is_refused(server, query):
    async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server.url, **query)) as ws:
        error = await next_error(ws)
        assert error["code"] == "bad_parameter"
        assert next(iter(query)) in error["message"]
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert status(server)["busy"] is False


async def test_second_user_gets_busy_at_once(server):
    async with aiohttp.ClientSession() as http:
        holder = await open_session(http, chat_url(server.url))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        async with http.ws_connect(chat_url(server.url)) as second:
            # aiohttp's client asks for permessage-deflate, as browsers do; Opus does not
            # compress, so the server declines it on chat sockets and refusals alike.
            assert holder.compress == 0 and second.compress == 0
            error = await next_error(second, timeout=1.0)
            elapsed = time.monotonic() - started
            closing = await second.receive(timeout=2)
        assert error["code"] == "busy"
        assert error["session_seconds"] >= 0.3
        assert elapsed < 1.0
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1013
        await holder.close()
    await wait_free(server)


def _valid_pages(seconds: float = 1.0) -> list[bytes]:
    tone = 0.2 * np.sin(np.arange(int(SAMPLE_RATE * seconds)) * 2 * np.pi * 220 / SAMPLE_RATE)
    return [p for p in ogg_pages(tone.astype(np.float32)) if p]


# (what is sent, expected error code or None, whether the session goes on after it)
BAD_INPUTS = {
    "garbage_audio": ([b"\x01" + b"not an ogg page at all" * 10], "bad_audio", False),
    "truncated_ogg": (["VALID", b"\x01OggS" + bytes(range(250))], "bad_audio", False),
    "corrupted_ogg": (["VALID", "CORRUPT"], "bad_audio", False),
    "unknown_kind": ([b"\x09hello"], "unknown_kind", True),
    "empty_message": ([b""], "empty_message", True),
    "text_frame": (["TEXT:こんにちは"], "text_frame", True),
    "control_and_ping_ignored": ([b"\x03\x00", b"\x06"], None, True),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
async def test_bad_input_is_answered_and_frees_the_model(server, name):
    messages, code, survives = BAD_INPUTS[name]
    async with aiohttp.ClientSession() as http:
        ws = await open_session(http, chat_url(server.url))
        for message in messages:
            if message == "VALID":
                for page in _valid_pages(0.5):
                    await ws.send_bytes(b"\x01" + page)
            elif message == "CORRUPT":
                page = bytearray(_valid_pages(0.5)[-1])
                page[-3] ^= 0x55  # one flipped byte in the Opus payload
                await ws.send_bytes(b"\x01" + bytes(page))
            elif isinstance(message, str):
                await ws.send_str(message.removeprefix("TEXT:"))
            else:
                await ws.send_bytes(message)
        if code is not None:
            error = await next_error(ws)
            assert error["code"] == code
        if survives:
            # The session goes on: valid audio still gets audio back.
            for page in _valid_pages(1.0):
                await ws.send_bytes(b"\x01" + page)
            got_audio = False
            while not got_audio:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                got_audio = msg.data[:1] == b"\x01"
        else:
            closing = await ws.receive(timeout=10)
            while closing.type == aiohttp.WSMsgType.BINARY:
                closing = await ws.receive(timeout=10)
            assert closing.type == aiohttp.WSMsgType.CLOSE
        await ws.close()
    await wait_free(server)
    # The next session works.
    result = await converse(
        chat_url(server.url), np.zeros(SAMPLE_RATE, np.float32), realtime=False, tail_seconds=0.3
    )
    assert result.errors == [] and result.audio.size > 0
    await wait_free(server)


async def test_oversized_message_is_refused(start_server):
    server = start_server("--max-message-bytes", "4096")
    async with aiohttp.ClientSession() as http:
        ws = await open_session(http, chat_url(server.url))
        await ws.send_bytes(b"\x01OggS" + bytes(10_000))
        error = await next_error(ws)
        assert error["code"] == "message_too_large"
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1009
    await wait_free(server)
    assert "message_too_large" in server.log_text() or "larger than" in server.log_text()
    result = await converse(
        chat_url(server.url), np.zeros(SAMPLE_RATE, np.float32), realtime=False, tail_seconds=0.3
    )
    assert result.errors == []


async def test_disconnect_mid_stream_frees_the_model(server, speech_pcm):
    async with aiohttp.ClientSession() as http:
        ws = await open_session(http, chat_url(server.url))
        for page in ogg_pages(speech_pcm[:SAMPLE_RATE]):
            if page:
                await ws.send_bytes(b"\x01" + page)
        # Drop the TCP connection without a close frame.
        ws._response.connection.transport.abort()  # a vanished client: no close frame
    await wait_free(server)
    result = await converse(chat_url(server.url), speech_pcm[:SAMPLE_RATE], realtime=False, tail_seconds=0.3)
    assert result.errors == []


async def test_silent_client_is_dropped_by_heartbeat(start_server):
    server = start_server("--heartbeat-seconds", "1")
    async with aiohttp.ClientSession() as http:
        # autoping off and never reading: the client does not answer the server's pings.
        ws = await http.ws_connect(chat_url(server.url), autoping=False)
        await asyncio.sleep(0.5)
        assert status(server)["busy"] is True
        started = time.monotonic()
        await wait_free(server, timeout=5)
        assert time.monotonic() - started < 4
        await ws.close()


async def test_input_faster_than_the_model_is_dropped_not_queued(server, speech_pcm):
    """Ten seconds of audio sent at once: the queue stays within its budget, drops are counted."""
    before = status(server)
    long_input = np.tile(speech_pcm, 2)[: SAMPLE_RATE * 10]
    result = await converse(chat_url(server.url), long_input, realtime=False, tail_seconds=1.0)
    after = status(server)
    frames_sent = len(long_input) // 1920
    processed = after["frames_processed"] - before["frames_processed"]
    dropped = after["frames_dropped"] - before["frames_dropped"]
    assert dropped > 0, "a burst far beyond the budget must drop input"
    # Every frame the server decoded was stepped, dropped, or still queued (at most the
    # budget) when the client left; sphn may hold the last few undecoded.
    ended = re.findall(r"(\d+) frames in, \d+ out, (\d+) dropped", server.log_text())[-1]
    frames_in = int(ended[0])
    budget_frames = round(1500 / 80)  # the shared server's --input-budget-ms
    assert processed + dropped <= frames_in <= min(frames_sent, processed + dropped + budget_frames)
    assert int(ended[1]) == dropped
    # Bounded latency: the server did not work through the whole backlog.
    assert processed < frames_in
    assert len(result.audio) / SAMPLE_RATE < 10
    await wait_free(server)
