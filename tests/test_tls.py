"""HTTPS: when it is on, the generated certificate (names, reuse, renewal), wss end to end."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from jmoshi_server import tls
from jmoshi_server.cli import announce
from jmoshi_server.client import chat_url, client_ssl, converse
from jmoshi_server.config import parse_config

REPO = Path(__file__).resolve().parent.parent


def primary_address() -> str | None:
    """The machine's main address, found independently of jmoshi_server.tls."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("8.8.8.8", 53))  # UDP connect sends nothing
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def served_fingerprint(port: int) -> str:
    """SHA-256 of the certificate the server presents, without trusting it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex(":").upper()


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-data")


@pytest.fixture(scope="module")
def tls_server(start_server, tls_dir: Path):
    return start_server(
        "--tls", "on", "--data-dir", str(tls_dir), "--public-hosts", "jmoshi.test,10.11.12.13", scheme="https"
    )


def test_tls_on_generates_a_private_key_and_a_certificate(tls_server, tls_dir: Path) -> None:
    cert_path, key_path = tls_dir / "tls" / "cert.pem", tls_dir / "tls" / "key.pem"
    assert cert_path.is_file() and key_path.is_file()
    assert key_path.stat().st_mode & 0o077 == 0, "the private key must be readable by its owner only"
    cert = load_cert(cert_path)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=825)  # Apple's limit


def test_tls_sans_hold_the_addresses(tls_server, tls_dir: Path) -> None:
    names = set(tls.san_names(load_cert(tls_dir / "tls" / "cert.pem")))
    expected = {"localhost", "127.0.0.1", socket.gethostname().lower(), "jmoshi.test", "10.11.12.13"}
    if (address := primary_address()) is not None:
        expected.add(address)
    assert expected <= names


def test_tls_https_verifies_against_the_generated_cert(tls_server, tls_dir: Path) -> None:
    context = ssl.create_default_context(cafile=str(tls_dir / "tls" / "cert.pem"))
    for host in ("127.0.0.1", "localhost"):
        url = f"https://{host}:{tls_server.port}/readyz"
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            assert response.status == 200
    with pytest.raises(urllib.error.URLError):  # and it is not trusted without it
        urllib.request.urlopen(f"https://127.0.0.1:{tls_server.port}/readyz", timeout=5)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain http on that port
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.port}/readyz", timeout=5)


async def test_tls_wss_chat_with_the_generated_cert(tls_server, tls_dir: Path, speech_pcm) -> None:
    trust = client_ssl(insecure=False, cafile=str(tls_dir / "tls" / "cert.pem"))
    url = chat_url(tls_server.url)
    assert url.startswith("wss://")
    result = await converse(url, speech_pcm[: 24000 * 2], realtime=False, tail_seconds=0.5, ssl_context=trust)
    assert result.handshake_seconds is not None, result.errors
    assert result.audio_messages > 0
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # the system CAs do not know it
        await converse(url, speech_pcm[:24000], realtime=False)


def test_tls_logs_urls_and_fingerprint(tls_server, tls_dir: Path) -> None:
    fingerprint = tls.fingerprint(load_cert(tls_dir / "tls" / "cert.pem"))
    log = tls_server.log_text()
    assert f"fingerprint: {fingerprint}" in log
    assert f"https://jmoshi.test:{tls_server.port}/" in log
    assert f"https://10.11.12.13:{tls_server.port}/" in log


def test_tls_healthcheck_follows_the_config(tls_server) -> None:
    env = {**os.environ, "JMOSHI_TLS": "on", "JMOSHI_PORT": str(tls_server.port), "JMOSHI_HOST": "0.0.0.0"}
    run = [sys.executable, "-m", "jmoshi_server.healthcheck"]
    ok = subprocess.run(run, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(
        [*run, "--tls", "off"], check=False, env=env, cwd=REPO, capture_output=True, timeout=30
    )
    assert wrong.returncode == 1


def test_tls_cert_reused_on_restart_and_auto_serves_https_on_the_lan(
    start_server, tls_server, tls_dir: Path
) -> None:
    """Restarted on 0.0.0.0 with --tls auto (the container's setup): HTTPS, the same certificate."""
    before = served_fingerprint(tls_server.port)
    assert tls_server.stop() == 0
    again = start_server(
        "--host",
        "0.0.0.0",
        "--data-dir",
        str(tls_dir),
        "--public-hosts",
        "jmoshi.test,10.11.12.13",
        scheme="https",
    )
    assert served_fingerprint(again.port) == before
    log = again.log_text()
    assert "(https)" in log and "kept from an earlier start" in log
    assert "no --token" in log


def test_tls_auto_on_loopback_is_plain_http(server) -> None:
    with urllib.request.urlopen(server.url + "/readyz", timeout=5) as response:
        assert response.status == 200
    assert server.url.startswith("http://")


# ---- the certificate store, without a server ------------------------------------------------


def _config(tmp_path: Path, *args: str):
    return parse_config(["--tls", "on", "--data-dir", str(tmp_path), *args], env={})


def test_tls_enabled_modes() -> None:
    def on(*args: str) -> bool:
        return tls.enabled(parse_config(list(args), env={}))

    assert not on("--host", "127.0.0.1")
    assert not on("--host", "localhost")
    assert not on("--host", "::1")
    assert on("--host", "0.0.0.0")
    assert on("--host", "192.168.1.20")
    assert on("--host", "127.0.0.1", "--tls", "on")
    assert not on("--host", "0.0.0.0", "--tls", "off")


def test_tls_off_on_a_lan_address_is_plain_http_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, "--host", "0.0.0.0", "--tls", "off")
    assert tls.setup(config) is None
    assert not (tmp_path / "tls").exists()
    with caplog.at_level(logging.INFO, logger="jmoshi_server"):
        announce(config, None)
    assert "serving plain http" in caplog.text


def test_tls_lan_urls_name_the_main_address(tmp_path: Path) -> None:
    config = _config(tmp_path, "--host", "0.0.0.0")
    address = primary_address()
    if address is None:
        pytest.skip("no network address besides loopback")
    assert address in tls.advertised_hosts(config)
    assert address in tls.certificate_names(config)
    assert set(tls.required_hosts(config)) <= set(tls.certificate_names(config))


def test_tls_certificate_renewed_for_a_new_address(tmp_path: Path) -> None:
    first = tls.setup(_config(tmp_path, "--public-hosts", "10.0.0.5"))
    same = tls.setup(_config(tmp_path, "--public-hosts", "10.0.0.5"))
    moved = tls.setup(_config(tmp_path, "--public-hosts", "10.0.0.6"))
    assert first and same and moved
    assert first.generated and not same.generated and moved.generated
    assert same.fingerprint == first.fingerprint != moved.fingerprint
    assert "10.0.0.6" in moved.names


def test_tls_certificate_renewed_when_expiring_or_broken(tmp_path: Path) -> None:
    config = _config(tmp_path)
    cert_path, key_path, _ = tls.ensure_certificate(config)
    required = tls.required_hosts(config)
    assert tls.renewal_reason(cert_path, key_path, required) is None
    later = dt.datetime.now(dt.UTC) + tls.VALIDITY - dt.timedelta(days=1)
    assert "expires" in (tls.renewal_reason(cert_path, key_path, required, now=later) or "")
    key_path.write_text("not a key")
    assert tls.renewal_reason(cert_path, key_path, required) is not None
    assert tls.ensure_certificate(config)[2] is True  # made again


def test_tls_own_certificate_is_used(tmp_path: Path) -> None:
    cert_pem, key_pem = tls.generate_certificate(["mine.example"])
    (tmp_path / "mine.pem").write_bytes(cert_pem)
    (tmp_path / "mine-key.pem").write_bytes(key_pem)
    setup = tls.setup(
        _config(
            tmp_path, "--tls-cert", str(tmp_path / "mine.pem"), "--tls-key", str(tmp_path / "mine-key.pem")
        )
    )
    assert setup is not None and setup.names == ("mine.example",) and not setup.generated
    assert not (tmp_path / "tls").exists(), "nothing is generated when a certificate is given"
    with pytest.raises(SystemExit):  # a key without its certificate is refused at parse time
        parse_config(["--tls-key", str(tmp_path / "mine-key.pem")], env={})
