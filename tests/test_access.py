"""Access control: the token on HTTP and the chat socket, the socket's Origin check, the bind."""

from __future__ import annotations

import json
import socket

import aiohttp
import pytest

from jmoshi_server.client import chat_url
from jmoshi_server.config import parse_config
from jmoshi_server.protocol import Kind

TOKEN = "s3cret-token-for-tests"
ALLOWED = "http://allowed.example:8080"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server("--token", TOKEN, "--allowed-origins", ALLOWED)


async def first_messages(url: str, **kwargs) -> tuple[list[bytes], int | None]:
    """Messages up to the handshake (or the close), and the close code (None if still open)."""
    messages: list[bytes] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url, **kwargs) as ws:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                messages.append(msg.data)
                if msg.data[0] == Kind.HANDSHAKE:
                    break
        code = ws.close_code
    return messages, code


def browser() -> aiohttp.ClientSession:
    """A session that keeps cookies for IP-address hosts, as browsers do (aiohttp does not)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def handshake_in(messages: list[bytes]) -> bool:
    return any(m[0] == Kind.HANDSHAKE for m in messages)


# ---- HTTP -----------------------------------------------------------------------------------


async def test_access_http_needs_the_token(guarded) -> None:
    async with browser() as http:
        async with http.get(guarded.url + "/api/status") as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"] == "unauthorized"
        async with http.get(guarded.url + "/index.html", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(guarded.url + "/api/status", headers=BEARER) as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        for open_path in ("/healthz", "/readyz"):  # container health checks need no token
            async with http.get(guarded.url + open_path) as resp:
                assert resp.status == 200


async def test_access_browser_gets_a_login_form(guarded) -> None:
    async with browser() as http:
        async with http.get(guarded.url + "/", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 401
            page = await resp.text()
            assert 'action="/api/login"' in page and 'name="token"' in page
        # The form posts here; a wrong token shows the form again, the right one sets the cookie.
        form = {"token": "wrong", "next": "/"}
        async with http.post(guarded.url + "/api/login", data=form, allow_redirects=False) as resp:
            assert resp.status == 401
        form = {"token": TOKEN, "next": "//evil.example/"}
        async with http.post(guarded.url + "/api/login", data=form, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/", "the login must not redirect off the server"
            cookie = resp.cookies["jmoshi_token"]
            assert cookie["httponly"] and cookie["samesite"] == "Lax"
            assert cookie.value != TOKEN, "the cookie holds a derived value, not the token"
        async with http.get(guarded.url + "/") as resp:
            assert resp.status == 200


async def test_access_login_api_sets_the_cookie(guarded) -> None:
    async with browser() as http:
        async with http.post(guarded.url + "/api/login", json={"token": "nope"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        async with http.post(guarded.url + "/api/login", json={"token": TOKEN}) as resp:
            assert resp.status == 200
            assert "jmoshi_token" in resp.cookies
        async with http.get(guarded.url + "/api/status") as resp:
            assert resp.status == 200


async def test_access_query_token_sets_the_cookie_and_leaves_the_url(guarded) -> None:
    async with browser() as http:
        async with http.get(guarded.url + "/?token=wrong", allow_redirects=False) as resp:
            assert resp.status == 401
        async with http.get(guarded.url + f"/?token={TOKEN}&lang=ja", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/?lang=ja"
            assert "jmoshi_token" in resp.cookies
        async with http.get(guarded.url + "/?lang=ja") as resp:
            assert resp.status == 200


def test_access_log_prints_the_link_with_the_token(guarded) -> None:
    assert f"?token={TOKEN}" in guarded.log_text()


# ---- the chat socket ------------------------------------------------------------------------


async def test_access_websocket_without_token_gets_unauthorized(guarded) -> None:
    for headers in (None, {"Authorization": "Bearer wrong"}):
        messages, code = await first_messages(chat_url(guarded.url), headers=headers)
        assert len(messages) == 1, "nothing but the error"
        assert messages[0][0] == Kind.ERROR
        assert json.loads(messages[0][1:])["code"] == "unauthorized"
        assert code == 1008
    assert "chat refused: no valid token" in guarded.log_text()


@pytest.mark.parametrize("how", ["header", "cookie", "query"])
async def test_access_websocket_with_token(guarded, how: str) -> None:
    url, kwargs = chat_url(guarded.url), {}
    if how == "header":
        kwargs["headers"] = BEARER
    elif how == "query":
        url = chat_url(guarded.url, token=TOKEN)
    if how == "cookie":
        async with browser() as http, http.post(guarded.url + "/api/login", json={"token": TOKEN}) as resp:
            assert resp.status == 200
            cookie = resp.cookies["jmoshi_token"]
        kwargs["headers"] = {"Cookie": f"jmoshi_token={cookie.value}"}
    messages, _ = await first_messages(url, **kwargs)
    assert handshake_in(messages), messages


async def test_access_cross_origin_upgrade_refused(guarded) -> None:
    for origin in ("http://evil.example", f"http://127.0.0.1:{guarded.port + 1}", "null"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await first_messages(chat_url(guarded.url), headers=BEARER, origin=origin)
        assert refused.value.status == 403
    assert "is not this server's" in guarded.log_text()


async def test_access_dns_rebinding_refused(guarded) -> None:
    """A page at http://rebound.example:PORT whose name now points here: Origin == Host."""
    host = f"rebound.example:{guarded.port}"
    headers = {**BEARER, "Host": host}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await first_messages(chat_url(guarded.url), headers=headers, origin=f"http://{host}")
    assert refused.value.status == 403


@pytest.mark.parametrize("origin", ["same", "localhost", ALLOWED])
async def test_access_same_or_listed_origin_accepted(guarded, origin: str) -> None:
    headers = dict(BEARER)
    if origin == "same":
        origin = guarded.url
    elif origin == "localhost":
        origin = f"http://localhost:{guarded.port}"
        headers["Host"] = f"localhost:{guarded.port}"
    messages, _ = await first_messages(chat_url(guarded.url), headers=headers, origin=origin)
    assert handshake_in(messages), messages


def test_access_binds_exactly_the_host(guarded) -> None:
    """Bound to 127.0.0.1, the port must not answer on the machine's other addresses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 53))
        except OSError:
            pytest.skip("no network address besides loopback")
        address = probe.getsockname()[0]
    with pytest.raises(OSError):
        socket.create_connection((address, guarded.port), timeout=2).close()


def test_access_config_checks() -> None:
    assert parse_config([], env={"JMOSHI_TOKEN": ""}).token is None, "an empty env value means unset"
    assert "s3cret" not in repr(parse_config(["--token", "s3cret"], env={}))
    for bad in (["--token", " "], ["--allowed-origins", "evil.example"]):
        with pytest.raises(SystemExit):
            parse_config(bad, env={})
    with pytest.raises(SystemExit):  # choices hold for values from the environment too
        parse_config([], env={"JMOSHI_TLS": "yes"})
