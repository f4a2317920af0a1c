"""HTTPS for the LAN: when to serve it, the self-signed certificate, the SSL context.

Browsers give the microphone only to secure pages, and ``http://<LAN IP>`` is not one, so a
server others open over the network must speak HTTPS. With no certificate of one's own, the
server makes a self-signed one on first start and keeps it in the data directory, so a phone
that accepted it once keeps working after restarts.

The generated certificate is replaced only when it is missing or unreadable, expires within
``RENEW_BEFORE``, or no longer names the address people are told to open (``--public-hosts``,
else the bind address or, for a wildcard bind, this machine's main address). Any other change
would make every phone accept a new certificate for nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import Config

log = logging.getLogger(__name__)

# Apple refuses TLS server certificates valid for more than 825 days; a year is plenty.
VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class TlsError(RuntimeError):
    """A certificate or key that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TlsSetup:
    """What the server serves: the context, and what the log tells people about it."""

    context: ssl.SSLContext
    cert_path: Path
    fingerprint: str  # SHA-256 of the DER certificate, as browsers show it
    names: tuple[str, ...]  # the certificate's subject alternative names
    generated: bool  # True when this server made the certificate


# ---- when -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def enabled(config: Config) -> bool:
    """``auto`` serves HTTPS unless only this machine can connect (http://localhost is secure)."""
    if config.tls == "auto":
        return not is_loopback(config.host)
    return config.tls == "on"


# ---- addresses ------------------------------------------------------------------------------


def _usable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _interface_ipv4() -> list[str]:
    """Each network interface's IPv4 address (Linux), without extra packages or tools."""
    if not sys.platform.startswith("linux"):
        return []
    import fcntl

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                found.append(socket.inet_ntoa(reply[20:24]))
    return found


def _route_ipv4() -> list[str]:
    """The address this machine would use to reach other networks (connecting UDP sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return [sock.getsockname()[0]]
        except OSError:
            return []


def _hostname_addresses() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return []
    return [str(info[4][0]) for info in infos]


def local_addresses() -> list[str]:
    """This machine's addresses others on the network can use (no loopback or link-local)."""
    found: list[str] = []
    for address in (*_route_ipv4(), *_interface_ipv4(), *_hostname_addresses()):
        if _usable(address) and address not in found:
            found.append(address)
    return found


def hostnames() -> list[str]:
    """This machine's name, and its mDNS ``.local`` name that phones often resolve."""
    name = socket.gethostname().lower()
    names = [name] if name else []
    if name and "." not in name:
        names.append(f"{name}.local")
    return names


def advertised_hosts(config: Config) -> list[str]:
    """The hosts the startup log tells people to open (the main address first)."""
    if config.public_host_list:
        return config.public_host_list
    if config.host in WILDCARD_HOSTS:
        return local_addresses() or ["127.0.0.1"]
    return [config.host]


def required_hosts(config: Config) -> list[str]:
    """The names a kept certificate must still hold, else it is made again.

    For a wildcard bind only the main address counts: a VPN or container bridge coming and
    going must not make every phone accept a new certificate.
    """
    if config.public_host_list:
        return config.public_host_list
    if config.host in WILDCARD_HOSTS:
        return [address for address in _route_ipv4() if _usable(address)]
    return [config.host]


def certificate_names(config: Config) -> list[str]:
    """Every name the generated certificate holds: advertised, local, loopback, hostname."""
    names: list[str] = []
    for name in (
        *advertised_hosts(config),
        *hostnames(),
        "localhost",
        "127.0.0.1",
        "::1",
        *local_addresses(),
    ):
        if name and name not in WILDCARD_HOSTS and name.lower() not in names:
            names.append(name.lower())
    return names


# ---- the certificate ------------------------------------------------------------------------


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*(name.lower() for name in san.get_values_for_type(x509.DNSName)), *ips]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def generate_certificate(names: Iterable[str], now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed server certificate (ECDSA P-256) for ``names``: (cert PEM, key PEM).

    Built as browsers and Apple's rules want a leaf: names in the SAN, serverAuth usage, not a
    CA (Chrome and Firefox refuse CA certificates used as a server's own).
    """
    names = list(names)
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"jmoshi-server {names[0]}"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jmoshi-server (self-signed)"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a phone's clock a little behind
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def renewal_reason(
    cert_path: Path, key_path: Path, required: Iterable[str], now: dt.datetime | None = None
) -> str | None:
    """Why the generated certificate must be made again, or None to keep it."""
    now = now or dt.datetime.now(dt.UTC)
    if not cert_path.is_file() or not key_path.is_file():
        return "no certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        return f"the stored certificate cannot be read ({exc})"
    if key.public_key() != cert.public_key():
        return "the stored key does not match the certificate"
    if cert.not_valid_after_utc - RENEW_BEFORE <= now:
        return f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    have = {_canonical(name) for name in san_names(cert)}
    missing = [name for name in required if _canonical(name) not in have]
    if missing:
        return f"it does not name {', '.join(missing)}"
    return None


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name.lower()


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only this user can read, replacing any old one atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def ensure_certificate(config: Config) -> tuple[Path, Path, bool]:
    """The generated certificate's (cert, key) paths, made now if needed; True when new."""
    directory = config.resolved_data_dir / "tls"
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    reason = renewal_reason(cert_path, key_path, required_hosts(config))
    if reason is None:
        return cert_path, key_path, False
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = certificate_names(config)
        cert_pem, key_pem = generate_certificate(names)
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert_pem)
    except OSError as exc:
        raise TlsError(f"cannot write the certificate into {directory}: {exc}") from exc
    log.info("made a new self-signed certificate in %s (%s)", cert_path, reason)
    return cert_path, key_path, True


def build_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Keep TLS 1.2: some Safari versions fail secure WebSockets when only TLS 1.3 is offered.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot use {cert_path} with {key_path}: {exc}") from exc
    return context


def setup(config: Config) -> TlsSetup | None:
    """The SSL context to serve with, or None when HTTPS is off. Raises TlsError."""
    if not enabled(config):
        return None
    if config.tls_cert and config.tls_key:
        cert_path, key_path, generated = config.tls_cert, config.tls_key, False
    else:
        cert_path, key_path, generated = ensure_certificate(config)
    context = build_context(cert_path, key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, OSError) as exc:
        raise TlsError(f"cannot read the certificate {cert_path}: {exc}") from exc
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        log.warning("%s expired on %s: browsers will refuse it", cert_path, cert.not_valid_after_utc)
    return TlsSetup(context, cert_path, fingerprint(cert), tuple(san_names(cert)), generated)
