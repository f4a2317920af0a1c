"""``jmoshi-client``: talk to a server from a WAV file, no browser needed.

Streams the input in real time (80 ms Ogg/Opus pages, as the page does), writes the model's
audio to a WAV and prints its text. ``converse`` is the same thing as a library call, used by
the tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import numpy as np
import sphn

from .protocol import Kind

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920


@dataclass
class ChatResult:
    """What came back from one conversation."""

    metadata: dict | None = None
    errors: list[dict] = field(default_factory=list)
    text: str = ""
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    handshake_seconds: float | None = None  # connect -> handshake
    first_audio_seconds: float | None = None  # first input page sent -> first audio received
    close_code: int | None = None
    audio_messages: int = 0
    stats: list[dict] = field(default_factory=list)  # the server's 0x08 stats messages, in order

    @property
    def error_codes(self) -> list[str]:
        return [e.get("code", "?") for e in self.errors]


def chat_url(base: str, **params: object) -> str:
    """``ws(s)://host:port/api/chat?...`` from an http(s) or ws(s) base URL."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path.endswith("/api/chat") else parts.path.rstrip("/") + "/api/chat"
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def ogg_pages(pcm: np.ndarray) -> list[bytes]:
    """The input as the Ogg/Opus messages a client sends, one per 80 ms frame (some empty)."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    usable = len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES
    return [writer.append_pcm(pcm[i : i + FRAME_SAMPLES]) for i in range(0, usable, FRAME_SAMPLES)]


class _Conversation:
    """One chat: collects what the server sends while the caller streams input."""

    def __init__(self, on_text: Callable[[str], None] | None) -> None:
        self.result = ChatResult()
        self.on_text = on_text
        self.started = time.monotonic()
        self.first_sent: float | None = None
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._chunks: list[np.ndarray] = []

    def on_message(self, data: bytes) -> None:
        result = self.result
        kind, payload = data[0], data[1:]
        if kind == Kind.HANDSHAKE:
            result.handshake_seconds = time.monotonic() - self.started
        elif kind == Kind.METADATA:
            result.metadata = json.loads(payload)
        elif kind == Kind.ERROR:
            result.errors.append(json.loads(payload))
        elif kind == Kind.STATS:
            result.stats.append(json.loads(payload))
        elif kind == Kind.TEXT:
            piece = payload.decode("utf-8")
            result.text += piece
            if self.on_text:
                self.on_text(piece)
        elif kind == Kind.AUDIO:
            result.audio_messages += 1
            if result.first_audio_seconds is None and self.first_sent is not None:
                result.first_audio_seconds = time.monotonic() - self.first_sent
            out = self._reader.append_bytes(payload)
            if out.size:
                self._chunks.append(out)

    async def receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                self.on_message(msg.data)

    async def send(self, ws: aiohttp.ClientWebSocketResponse, pcm: np.ndarray, realtime: bool) -> None:
        t0 = time.monotonic()
        for index, page in enumerate(ogg_pages(pcm)):
            if ws.closed:  # the server ended the session (a limit, an error): stop talking
                return
            if self.first_sent is None:
                self.first_sent = time.monotonic()
            if page:
                await ws.send_bytes(bytes((Kind.AUDIO,)) + page)
            if realtime:
                delay = t0 + (index + 1) * FRAME_SAMPLES / SAMPLE_RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    def finish(self, close_code: int | None) -> ChatResult:
        self.result.close_code = close_code
        if self._chunks:
            self.result.audio = np.concatenate(self._chunks)
        return self.result


async def converse(
    url: str,
    pcm: np.ndarray,
    *,
    realtime: bool = True,
    tail_seconds: float = 1.0,
    session: aiohttp.ClientSession | None = None,
    on_text: Callable[[str], None] | None = None,
    token: str | None = None,
    ssl_context: ssl.SSLContext | bool = True,
) -> ChatResult:
    """Stream ``pcm`` (24 kHz mono float32) to a chat URL and collect the answer.

    Waits for the handshake before sending (as the page does); on a refusal (busy, bad
    parameter...) it sends nothing and returns the server's error. ``token`` is sent as a
    Bearer header; ``ssl_context`` is aiohttp's ``ssl`` (False: do not check the certificate).
    """
    chat = _Conversation(on_text)
    own_session = session is None
    session = session or aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with session.ws_connect(
            url, heartbeat=10, max_msg_size=0, headers=headers, ssl=ssl_context
        ) as ws:
            receiver = asyncio.create_task(chat.receive(ws))
            while chat.result.handshake_seconds is None and not receiver.done():
                await asyncio.sleep(0.01)
            if chat.result.handshake_seconds is not None:
                await chat.send(ws, pcm, realtime)
                await asyncio.sleep(tail_seconds)
                await ws.close()
            await receiver
            return chat.finish(ws.close_code)
    finally:
        if own_session:
            await session.close()


def read_audio(path: str) -> np.ndarray:
    data, _ = sphn.read(path, sample_rate=SAMPLE_RATE)
    return data.mean(axis=0).astype(np.float32) if data.ndim == 2 else data.astype(np.float32)


def client_ssl(insecure: bool, cafile: str | None) -> ssl.SSLContext | bool:
    """What to trust: the system's CAs, one file (the server's self-signed cert), or nothing."""
    if insecure:
        return False
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    return True


def _explain(exc: Exception, url: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"{url}: the server's certificate is not trusted ({exc.certificate_error}). For the "
            "self-signed one, pass --cafile <data dir>/tls/cert.pem (or --insecure after checking "
            "the fingerprint the server logs)"
        )
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        hint = {401: " (pass --token)", 403: " (this origin is not allowed)"}.get(exc.status, "")
        return f"{url}: the server refused the connection: HTTP {exc.status}{hint}"
    return f"{url}: cannot connect: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jmoshi-client", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="server URL, e.g. http://127.0.0.1:8998 or https://192.168.1.20:8998")
    parser.add_argument(
        "--token",
        default=os.environ.get("JMOSHI_TOKEN") or None,
        help="the server's --token [env JMOSHI_TOKEN]",
    )
    parser.add_argument("--cafile", help="trust this certificate (PEM), e.g. the server's tls/cert.pem")
    parser.add_argument("--insecure", action="store_true", help="do not check the server's certificate")
    parser.add_argument("--input", required=True, help="audio file to say (any rate; WAV, MP3, ...)")
    parser.add_argument("--output", help="write the model's audio here (WAV, 24 kHz)")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible, not in real time")
    for name, kind in (
        ("text_temperature", float),
        ("text_topk", int),
        ("audio_temperature", float),
        ("audio_topk", int),
        ("seed", int),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, dest=name)
    args = parser.parse_args(argv)
    params = {
        k: getattr(args, k)
        for k in ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed")
    }
    url = chat_url(args.url, **params)
    pcm = read_audio(args.input)

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    try:
        result = asyncio.run(
            converse(
                url,
                pcm,
                realtime=not args.fast,
                on_text=show,
                token=args.token,
                ssl_context=client_ssl(args.insecure, args.cafile),
            )
        )
    except (aiohttp.ClientError, OSError) as exc:
        print(_explain(exc, url), file=sys.stderr)
        return 1
    print()
    for error in result.errors:
        print(f"server error {error.get('code')}: {error.get('message')}", file=sys.stderr)
    if args.output and result.audio.size:
        sphn.write_wav(args.output, result.audio[None], SAMPLE_RATE)
    seconds_in, seconds_out = len(pcm) / SAMPLE_RATE, len(result.audio) / SAMPLE_RATE
    print(f"sent {seconds_in:.1f} s, received {seconds_out:.1f} s of audio", file=sys.stderr)
    return 1 if result.handshake_seconds is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
