"""How far behind is the client in reading what we sent? (a slow-consumer detector)

A client that stops reading is not noticed by asyncio for a long time: the kernel keeps
accepting our writes into the socket's send buffer (Linux lets it grow to ``tcp_wmem`` max,
4 MiB by default), and at the ~4 KB/s a voice session sends that is many minutes of audio
before the transport pauses and ``send`` waits for a drain. Meanwhile the model is held and
the user hears nothing.

So the session asks, after each send, how old the oldest byte is that the peer has not yet
acknowledged: the kernel's count of unsent + unacknowledged bytes (``SIOCOUTQ``, Linux)
plus asyncio's own buffer, matched against the times at which those bytes were handed
over. On other systems, or if the ioctl fails, only asyncio's buffer is counted (the
session's queue guard still bounds memory then). With TLS the kernel counts record
overhead too, which overstates the lag a little: the limit is generous for that reason.
"""

from __future__ import annotations

import array
import asyncio
import collections
import fcntl
import termios
import time

_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)  # same number as SIOCOUTQ on Linux


class SendLag:
    def __init__(self, transport: asyncio.BaseTransport | None) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        self._fd: int | None = sock.fileno() if sock is not None else None
        self._sent = 0
        self._marks: collections.deque[tuple[float, int]] = collections.deque()

    def _kernel_backlog(self) -> int:
        if self._fd is None:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self._fd, _SIOCOUTQ, buf, True)
        except OSError:
            self._fd = None
            return 0
        return buf[0]

    def _backlog(self) -> int:
        transport = self._transport
        if transport is None or transport.is_closing():
            return 0
        user = transport.get_write_buffer_size() if hasattr(transport, "get_write_buffer_size") else 0
        return user + self._kernel_backlog()

    def sent(self, nbytes: int) -> None:
        """Call after handing ``nbytes`` to the socket."""
        self._sent += nbytes
        self._marks.append((time.monotonic(), self._sent))

    def seconds(self) -> float:
        """Age of the oldest byte the peer has not acknowledged (0 when all is through)."""
        delivered = self._sent - self._backlog()
        marks = self._marks
        while marks and marks[0][1] <= delivered:
            marks.popleft()
        return time.monotonic() - marks[0][0] if marks else 0.0
