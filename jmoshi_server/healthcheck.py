"""``python -m jmoshi_server.healthcheck``: exit 0 when the local server is ready, else 1.

For the container's HEALTHCHECK. It reads the same flags and JMOSHI_* variables as the server,
so it asks the port and scheme the server really uses, and needs nothing (curl, wget) that a
slim image lacks. The server's certificate is not checked: this only asks itself.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import tls
from .config import parse_config

TIMEOUT_S = 4.0


def readyz_url(argv: Sequence[str] | None = None) -> str:
    config = parse_config(argv)
    host = config.host
    if host in tls.WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if tls.enabled(config) else "http"
    return f"{scheme}://{host}:{config.port}/readyz"


def main(argv: Sequence[str] | None = None) -> int:
    url = readyz_url(argv)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            print(f"{url}: ready")
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503 while the model loads: say why
        try:
            reason = json.loads(exc.read()).get("reason", exc.reason)
        except ValueError:
            reason = exc.reason
        print(f"{url}: not ready ({reason})")
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: no answer ({exc})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
