"""A deliberately minimal WebSocket client over a raw socket, for tests that misbehave.

aiohttp's client always behaves: it masks frames, answers pings, reads its socket. The fault
and fuzz tests need a client that can send broken frames, stop reading with a tiny receive
buffer, or hang up in the middle of the HTTP upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One WebSocket frame; ``length`` overrides the declared payload length (to lie)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class RawWS:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawWS:
        """A TCP connection to 127.0.0.1:port, optionally with a tiny receive buffer."""
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, port: int, path: str = "/api/chat", *, rcvbuf: int | None = None) -> RawWS:
        """Open and complete the upgrade; raises if the server does not switch protocols."""
        ws = await cls.open(port, rcvbuf=rcvbuf)
        ws.writer.write(upgrade_request("127.0.0.1", port, path))
        status = await asyncio.wait_for(ws.reader.readuntil(b"\r\n\r\n"), 10)
        if not status.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"no upgrade: {status[:80]!r}")
        return ws

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, opcode: int, payload: bytes = b"", **kw) -> None:
        self.writer.write(frame(opcode, payload, **kw))
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame (opcode, payload); raises EOFError when the server hung up."""

        async def read() -> tuple[int, bytes]:
            try:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
                return b0 & 0x0F, await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise EOFError(str(exc)) from None

        return await asyncio.wait_for(read(), timeout)

    async def handshake(self, timeout: float = 10.0) -> bytes:
        """Wait for the 0x00 handshake and return the 0x04 metadata payload (or raise)."""
        opcode, first = await self.recv(timeout)
        if first != b"\x00":
            raise ConnectionError(f"no handshake: {opcode} {first[:200]!r}")
        _, meta = await self.recv(timeout)
        return meta

    def stop_reading(self) -> None:
        """Stop taking bytes off the socket: its receive buffer fills, then the server's send."""
        self.writer.transport.pause_reading()

    def abort(self) -> None:
        """Vanish: RST, no close frame."""
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None and not transport.is_closing():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close_tcp(self) -> None:
        """Hang up the TCP connection (FIN) without a WebSocket close frame."""
        self.writer.close()
