"""Fuzz (issue 7): over a thousand malformed sessions and messages against one real server,
then a normal session must work and the server must not have grown.

Seeded, so a failure replays: JMOSHI_FUZZ_SEED=<n> picks another seed. Three layers:

* protocol: well-formed WebSocket messages with bad content (random bytes, truncated and
  corrupted Ogg pages, pages re-checksummed so broken Opus reaches the decoder, huge
  messages, wrong kinds, empty and text messages), ended in every way a client can;
* WebSocket: broken frames from a raw socket (unmasked, reserved opcodes and bits, lying
  lengths, fragmented control frames, bad UTF-8, bad close codes);
* HTTP: hang-ups mid-request and mid-handshake, junk request lines, bad upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time

import aiohttp
import pytest
from robust_helpers import get, proc_stats, session_works, status, tone, wait_free, wait_until
from wsraw import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, RawWS, frame, upgrade_request

from jmoshi_server.client import chat_url, ogg_pages
from jmoshi_server.ogg import ogg_crc

MAX_MESSAGE = 65_536
SEED = int(os.environ.get("JMOSHI_FUZZ_SEED", "20240607"))
SESSIONS = 420
MIN_MESSAGES = 1000


def _pages() -> list[bytes]:
    return [page for page in ogg_pages(tone(2.0, 330.0)) if page]


PAGES = _pages()


def _split_pages(data: bytes) -> list[bytes]:
    """The individual Ogg pages in one message."""
    pages, offset = [], 0
    while offset < len(data):
        segments = data[offset + 26]
        body = sum(data[offset + 27 : offset + 27 + segments])
        end = offset + 27 + segments + body
        pages.append(data[offset:end])
        offset = end
    return pages


def _recrc(page: bytearray) -> bytes:
    page[22:26] = b"\0\0\0\0"
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    return bytes(page)


def _random_bytes(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(2000))


def _random_audio(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b"\x01" + rng.randbytes(rng.randrange(1, 3000))


def _truncated(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b"\x01" + page[: rng.randrange(1, len(page))]


def _flipped(rng: random.Random, page: bytes, single: bytes) -> bytes:
    """Flipped bits: the page checksum catches it."""
    broken = bytearray(page)
    for _ in range(rng.randrange(1, 4)):
        broken[rng.randrange(len(broken))] ^= 1 << rng.randrange(8)
    return b"\x01" + bytes(broken)


def _broken_opus(rng: random.Random, page: bytes, single: bytes) -> bytes:
    """Garbage Opus in a page with a valid checksum: it reaches the decoder."""
    broken = bytearray(single)
    body_start = 27 + broken[26]
    for _ in range(rng.randrange(1, 20)):
        if len(broken) > body_start:
            broken[rng.randrange(body_start, len(broken))] = rng.randrange(256)
    return b"\x01" + _recrc(broken)


def _nonsense_header(rng: random.Random, page: bytes, single: bytes) -> bytes:
    """Flags, granule, serial or sequence replaced, valid checksum."""
    broken = bytearray(single)
    start, size = rng.choice([(5, 1), (6, 8), (14, 4), (18, 4)])
    broken[start : start + size] = rng.randbytes(size)
    return b"\x01" + _recrc(broken)


def _headers_again(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b"\x01" + PAGES[0]  # OpusHead/OpusTags mid-stream


def _too_large(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b"\x01" + bytes(MAX_MESSAGE + rng.randrange(1, 5000))


def _wrong_kind(rng: random.Random, page: bytes, single: bytes) -> bytes:
    kind = rng.choice([0x00, 0x02, 0x04, 0x05, 0x07, 0x08, 0x7F, 0xFF])
    return bytes([kind]) + rng.randbytes(rng.randrange(300))


def _empty(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b""


def _text(rng: random.Random, page: bytes, single: bytes) -> str:
    alphabet = "あいうえおabc\u0000\ufffd😀\u202e"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(200)))


def _ignored_kinds(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return rng.choice([b"\x03\x00", b"\x03" + rng.randbytes(10), b"\x06"])


def _glued_short(rng: random.Random, page: bytes, single: bytes) -> bytes:
    glued = b"".join(PAGES[1:4])
    return b"\x01" + glued[: len(glued) - rng.randrange(1, 30)]


def _valid(rng: random.Random, page: bytes, single: bytes) -> bytes:
    return b"\x01" + page


MESSAGES = [
    _random_bytes,
    _random_audio,
    _truncated,
    _flipped,
    _broken_opus,
    _nonsense_header,
    _headers_again,
    _too_large,
    _wrong_kind,
    _empty,
    _text,
    _ignored_kinds,
    _glued_short,
    _valid,
    _valid,
]


def bad_message(rng: random.Random) -> bytes | str:
    """One malformed (or, sometimes, valid) client message; a str goes as a text frame."""
    page = rng.choice(PAGES[1:])
    single = rng.choice(_split_pages(page))
    return rng.choice(MESSAGES)(rng, page, single)


async def _end_session(ws: aiohttp.ClientWebSocketResponse, ending: int) -> None:
    if ending == 1:  # vanish without a close frame
        ws._response.connection.transport.abort()
    elif ending == 2:  # hang up TCP (FIN), no close frame
        ws._response.connection.transport.close()
    else:  # read what comes for a moment, then close properly
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError, ConnectionError, RuntimeError):
            deadline = time.monotonic() + (0.3 if ending == 3 else 0.05)
            while (left := deadline - time.monotonic()) > 0:
                msg = await ws.receive(timeout=left)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        await ws.close()


async def protocol_session(http: aiohttp.ClientSession, server, rng: random.Random) -> int:
    """One chat with bad content; returns how many messages it sent."""
    url = chat_url(server.url)
    for _ in range(200):  # the previous session may still be releasing the model
        ws = await http.ws_connect(url, max_msg_size=0, autoclose=rng.random() < 0.8)
        first = await ws.receive(timeout=15)
        if first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00":
            break
        await ws.close()
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the model never became free")
    sent = 0
    ending = rng.randrange(5)
    if ending == 0 and rng.random() < 0.5:  # gone right after the handshake
        ws._response.connection.transport.abort()
        return 1
    for _ in range(rng.randrange(1, 9)):
        payload = bad_message(rng)
        try:
            if isinstance(payload, str):
                await ws.send_str(payload)
            else:
                await ws.send_bytes(payload)
        except ConnectionError:
            break
        sent += 1
        if ws.closed:
            break
    await _end_session(ws, ending)
    return sent


def _bad_frames(rng: random.Random) -> list[bytes]:
    good = b"\x01" + PAGES[1]
    choices = [
        frame(OP_BINARY, good, mask=False),  # clients must mask
        frame(rng.choice([0x3, 0x4, 0x5, 0xB, 0xF]), b"x"),  # reserved opcodes
        frame(OP_BINARY, good, rsv=rng.randrange(1, 8)),  # reserved bits, no extension
        frame(OP_BINARY, b"\x01", length=1 << 62),  # lies about a huge length
        frame(OP_BINARY, b"\x01" + bytes(100), length=40),  # shorter than declared
        frame(OP_PING, bytes(200)),  # control frame > 125 bytes
        frame(OP_PING, b"x", fin=False),  # fragmented control frame
        frame(OP_CONT, b"orphan"),  # continuation with nothing to continue
        frame(OP_TEXT, b"\xff\xfe\xc3\x28"),  # invalid UTF-8
        frame(OP_CLOSE, struct.pack(">H", rng.choice([0, 999, 1004, 1005, 1006, 5000]))),  # bad codes
        frame(OP_CLOSE, b"\x03"),  # 1-byte close payload
        frame(OP_BINARY, b"\x01" + PAGES[1][:10], fin=False)
        + frame(OP_BINARY, b"restart"),  # a new message inside a fragmented one
        rng.randbytes(rng.randrange(1, 64)),  # not frames at all
    ]
    return [rng.choice(choices) for _ in range(rng.randrange(1, 4))]


async def raw_session(server, rng: random.Random) -> int:
    """Broken WebSocket frames or a broken HTTP exchange; returns messages sent."""
    layer = rng.randrange(6)
    try:
        if layer <= 2:  # upgrade, maybe get the handshake, then broken frames
            ws = await RawWS.connect(server.port)
            if rng.random() < 0.5:
                with contextlib.suppress(EOFError, ConnectionError, TimeoutError, asyncio.TimeoutError):
                    await ws.handshake(timeout=5)
            frames = _bad_frames(rng)
            for data in frames:
                ws.send_raw(data)
            with contextlib.suppress(ConnectionError):
                await ws.writer.drain()
            with contextlib.suppress(EOFError, ConnectionError, TimeoutError, asyncio.TimeoutError):
                await ws.recv(timeout=0.2)
            ws.abort() if rng.random() < 0.5 else ws.close_tcp()
            return len(frames)
        ws = await RawWS.open(server.port)
        request = upgrade_request("127.0.0.1", server.port, "/api/chat")
        if layer == 3:  # hang up in the middle of the HTTP request
            ws.send_raw(request[: rng.randrange(1, len(request))])
        elif layer == 4:  # junk or wrong upgrades
            ws.send_raw(
                rng.choice(
                    [
                        rng.randbytes(rng.randrange(1, 400)),
                        request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99"),
                        request.replace(b"Upgrade: websocket\r\n", b""),
                        b"GET /api/chat?" + b"a=" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                    ]
                )
            )
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.wait_for(ws.reader.read(4096), 2)
        else:  # complete the upgrade, leave before the model's handshake arrives
            ws.send_raw(request)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.wait_for(ws.reader.readuntil(b"\r\n\r\n"), 2)
        ws.abort() if rng.random() < 0.5 else ws.close_tcp()
        return 1
    except (ConnectionError, asyncio.IncompleteReadError):
        return 1  # the server hung up first: fine


@pytest.mark.slow
async def test_fuzz_many_malformed_sessions_then_a_normal_one(start_server):
    server = start_server("--max-message-bytes", str(MAX_MESSAGE), "--input-budget-ms", "1500")
    pid = server.proc.pid
    rng = random.Random(SEED)
    messages = 0
    sessions = 0
    started = time.monotonic()
    baseline = None
    async with aiohttp.ClientSession() as http:
        for i in range(SESSIONS):
            if i == 40:  # allocators and caches warmed up by then
                await wait_free(server)
                baseline = proc_stats(pid)
            # Each session draws from its own generator: what one session sends does not depend
            # on how far the previous one got before the server hung up.
            own = random.Random(rng.randrange(2**32))
            if own.random() < 0.7:
                messages += await protocol_session(http, server, own)
            else:
                messages += await raw_session(server, own)
            sessions += 1
    took = time.monotonic() - started
    assert sessions >= 300 and messages >= MIN_MESSAGES, (sessions, messages)
    print(f"fuzz: {sessions} sessions, {messages} messages in {took:.1f} s (seed {SEED})")

    # The server is healthy and a normal session works.
    await wait_free(server, timeout=20)
    assert get(server.url + "/readyz")[0] == 200
    await session_works(server)

    # Nothing grew: descriptors and threads back to the baseline, memory within a small bound.
    assert baseline is not None

    def settled() -> bool:
        now = proc_stats(pid)
        return now["fds"] <= baseline["fds"] + 3 and now["threads"] <= baseline["threads"] + 2

    await wait_until(settled, 20, f"descriptors/threads settling (baseline {baseline})")
    after = proc_stats(pid)
    print(f"server after warm-up: {baseline}; at the end: {after}")
    assert after["rss_mb"] - baseline["rss_mb"] < 40, (baseline, after)
    st = status(server)
    assert st["ready"] and not st["busy"]
    log = server.log_text()
    signs = ("Traceback", "session failed", "Task exception was never retrieved", "Exception in callback")
    for sign in signs:
        assert sign not in log, f"{sign!r} in the server log:\n{log[-3000:]}"
