#!/usr/bin/env python3
"""The HTTPS certificate for HAProxy, as one PEM (certificate, then key): HAProxy's `crt` format.

    python deploy/make_cert.py [--out PATH] [--port 8998]

Uses the server's own certificate code and settings (jmoshi_server.tls, JMOSHI_* variables), so
it behaves as a single jmoshi-server does: with JMOSHI_TLS_CERT/KEY set, that certificate is
used; otherwise a self-signed one is made once in <data dir>/tls, kept across restarts, and made
again only when it expires soon or no longer names JMOSHI_PUBLIC_HOSTS. Phones that accepted
the single server's certificate (same data volume) keep trusting it. Default output:
<data dir>/tls/haproxy.pem, readable by this user only. Prints the URLs and the fingerprint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from jmoshi_server import tls
from jmoshi_server.config import parse_config


def combined_pem(cert_path: Path, key_path: Path) -> bytes:
    """Certificate (chain) then key, each ending in a newline; checked to belong together."""
    tls.build_context(cert_path, key_path)  # raises TlsError when they do not match
    parts = [cert_path.read_bytes(), key_path.read_bytes()]
    return b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts)


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write (default: <data dir>/tls/haproxy.pem)")
    parser.add_argument("--port", type=int, default=8998, help="the port people open (for the URLs shown)")
    args = parser.parse_args(argv)
    # The server's own settings from JMOSHI_* (flags are not read here: they are this script's).
    config = parse_config([])
    try:
        if config.tls_cert and config.tls_key:
            cert_path, key_path, origin = config.tls_cert, config.tls_key, "from JMOSHI_TLS_CERT"
        else:
            cert_path, key_path, generated = tls.ensure_certificate(config)
            origin = "generated, self-signed" if generated else "self-signed, kept from an earlier start"
        pem = combined_pem(cert_path, key_path)
    except (tls.TlsError, OSError) as exc:
        print(f"make_cert: {exc}", file=sys.stderr)
        return 1
    out = args.out or config.resolved_data_dir / "tls" / "haproxy.pem"
    write_private(out, pem)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    hosts = [f"[{h}]" if ":" in h else h for h in tls.advertised_hosts(config)]
    print(f"wrote {out}: {cert_path} ({origin}) with its key")
    print(f"names: {', '.join(tls.san_names(cert))}")
    print(f"SHA-256 fingerprint: {tls.fingerprint(cert)}")
    print("open: " + "  ".join(f"https://{host}:{args.port}/" for host in hosts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
