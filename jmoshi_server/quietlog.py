"""Keep clients from filling the server log with tracebacks.

aiohttp logs every malformed HTTP request (a request line over 8 KiB, a broken header, junk
on the port) at ERROR with a full traceback, on ``aiohttp.server``. Those are the client's
mistakes, already answered with 400: this filter turns them into one WARNING line. Errors
in our own handlers keep their tracebacks.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class ClientErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            said = record.getMessage()  # "Error handling request from <peer>"
            why = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
            record.msg = "%s: bad HTTP request, answered %s (%s)"
            record.args = (said, exc.code, why[:200])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_client_errors() -> None:
    logging.getLogger("aiohttp.server").addFilter(ClientErrorFilter())
