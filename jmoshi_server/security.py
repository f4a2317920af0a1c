"""Who may use the server: the optional shared token, and the chat socket's Origin check.

Both are aiohttp middleware, registered by ``setup`` in the app factory.

Token (``--token``): every request carries it as ``Authorization: Bearer <token>``, as the
cookie ``/api/login`` sets once a person has typed it, or as ``?token=`` from the link the log
prints (a page request with it is redirected to the same URL without it, with the cookie set,
so the token does not stay in the address bar or history). ``/healthz`` and ``/readyz`` stay
open for container health checks: they tell nothing but whether the model is loaded. A refused
page request gets a small login form, an API request a 401 with JSON, and a chat socket the
protocol's ``unauthorized`` error (the upgrade is accepted so a browser can show why).

Origin: a web page on another site that a person on the LAN visits could otherwise open the
microphone channel and keep the GPU busy. A WebSocket upgrade whose ``Origin`` is not the
server's own (or listed in ``--allowed-origins``) is refused with 403 before the upgrade, so
such a page gets nothing. Requests without ``Origin`` (jmoshi-client, scripts) are not browser
pages and pass. Over plain http, "the server's own" also requires the Host to be one of this
server's names or an IP address: a DNS-rebinding page has Origin == Host == its own name.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, hdrs, web
from yarl import URL

from . import protocol, tls
from .config import Config
from .protocol import ErrorCode

log = logging.getLogger(__name__)

COOKIE_NAME = "jmoshi_token"
COOKIE_MAX_AGE = 30 * 24 * 3600  # a phone stays logged in for a month
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/api/login"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGIN_PAGE = """<!doctype html>
<html lang="ja"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>J-Moshi: トークン / token</title>
<style>body{{font-family:system-ui,sans-serif;max-width:24rem;margin:3rem auto;padding:0 1rem}}
input,button{{font-size:1.1rem;padding:.5rem;width:100%;box-sizing:border-box;margin:.3rem 0}}
.error{{color:#b00020}}</style></head>
<body><h1>J-Moshi</h1>
<p>このサーバーにはトークンが必要です。<br>This server needs its access token.</p>
{error}
<form method="post" action="/api/login">
<input type="hidden" name="next" value="{next}">
<input type="password" name="token" autocomplete="current-password" placeholder="token" autofocus required>
<button type="submit">OK</button>
</form></body></html>
"""


def is_websocket(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def _safe_next(raw: str | None) -> str:
    """Only a path on this server: a login must not redirect anywhere else."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


class Guard:
    """The checks, with everything derived from the config computed once."""

    def __init__(self, config: Config) -> None:
        self.token = config.token.encode("utf-8") if config.token else None
        # The cookie holds a value derived from the token rather than the token itself.
        self.cookie_value = (
            hmac.new(self.token, b"jmoshi-server cookie v1", hashlib.sha256).hexdigest()
            if self.token
            else None
        )
        self.allowed_origins = frozenset(config.allowed_origin_list)
        self.own_names = frozenset(
            name.lower()
            for name in (*tls.hostnames(), "localhost", config.host, *config.public_host_list)
            if name
        )

    # ---- token ------------------------------------------------------------------------------

    def _matches(self, candidate: str | None, expected: bytes | None) -> bool:
        if not candidate or expected is None:
            return False
        return hmac.compare_digest(candidate.encode("utf-8"), expected)

    def credential(self, request: web.Request) -> str | None:
        """How the request proved it knows the token ("header", "cookie", "query"), or None."""
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(value.strip(), self.token):
            return "header"
        if self._matches(request.cookies.get(COOKIE_NAME), (self.cookie_value or "").encode()):
            return "cookie"
        if self._matches(request.query.get("token"), self.token):
            return "query"
        return None

    def set_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        assert self.cookie_value is not None
        response.set_cookie(
            COOKIE_NAME,
            self.cookie_value,
            max_age=COOKIE_MAX_AGE,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=request.secure,
        )

    async def refuse(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "?"
        if is_websocket(request):
            log.warning("[%s] chat refused: no valid token", peer)
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            message = (
                "this server needs its access token: type it on the page, or send it as "
                "'Authorization: Bearer <token>' or ?token="
            )
            with contextlib.suppress(ConnectionError, RuntimeError):  # the client may be gone
                await ws.send_bytes(protocol.encode_error(ErrorCode.UNAUTHORIZED, message))
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"unauthorized")
            return ws
        log.info("[%s] %s %s refused: no valid token", peer, request.method, request.path)
        if request.method == "GET" and "text/html" in request.headers.get(hdrs.ACCEPT, ""):
            return login_page(str(request.rel_url), error=None)
        return web.json_response(
            {
                "error": str(ErrorCode.UNAUTHORIZED),
                "message": "this server needs its access token: send 'Authorization: Bearer <token>'",
            },
            status=401,
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="jmoshi-server"'},
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """POST /api/login with JSON {"token"} (the page) or a form (the built-in login page)."""
        as_json = request.content_type == "application/json"
        try:
            data = await request.json() if as_json else await request.post()
        except ValueError:
            return web.json_response({"error": "bad_request", "message": "send JSON or a form"}, status=400)
        if not isinstance(data, dict) and as_json:
            return web.json_response({"error": "bad_request", "message": "send a JSON object"}, status=400)
        if self.token is None:
            return web.json_response({"ok": True, "token_required": False})
        token = data.get("token")
        if not isinstance(token, str) or not self._matches(token, self.token):
            log.warning("[%s] login with a wrong token", request.remote or "?")
            if as_json:
                return web.json_response(
                    {"error": str(ErrorCode.UNAUTHORIZED), "message": "wrong token"}, status=401
                )
            return login_page(_safe_next(data.get("next")), error="トークンが違います。Wrong token.")
        response: web.StreamResponse
        if as_json:
            response = web.json_response({"ok": True, "token_required": True})
        else:
            response = _see_other(_safe_next(data.get("next")))
        self.set_cookie(request, response)
        return response

    # ---- origin -----------------------------------------------------------------------------

    def origin_allowed(self, request: web.Request, origin: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        try:
            page = URL(origin)
            served = URL(f"{page.scheme}://{request.host}")
        except ValueError:
            return False
        if page.scheme not in ("http", "https") or not page.host or page.path not in ("", "/"):
            return False
        if (page.host, page.port) != ((served.host or "").lower(), served.port):
            return False
        if request.secure:
            return True  # a rebinding page cannot present this server's certificate
        return self._is_own_host(page.host)

    def _is_own_host(self, host: str) -> bool:
        return host in self.own_names or _is_ip(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={hdrs.LOCATION: location})


def login_page(next_path: str, error: str | None) -> web.Response:
    body = LOGIN_PAGE.format(
        next=html.escape(_safe_next(next_path)),
        error=f'<p class="error">{html.escape(error)}</p>' if error else "",
    )
    return web.Response(text=body, content_type="text/html", status=401)


def setup(app: web.Application, config: Config) -> None:
    """Add the Origin check, the token check (when --token is set) and /api/login to ``app``."""
    guard = Guard(config)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and is_websocket(request) and not guard.origin_allowed(request, origin):
            log.warning(
                "[%s] chat refused: page origin %s is not this server's (Host %s); "
                "list it in --allowed-origins if it should be allowed",
                request.remote or "?",
                origin,
                request.host,
            )
            return web.json_response(
                {"error": "forbidden_origin", "message": f"pages from {origin} may not open the chat"},
                status=403,
            )
        return await handler(request)

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        how = guard.credential(request)
        if how is None:
            return await guard.refuse(request)
        if how == "query" and request.method == "GET" and not is_websocket(request):
            # A link with ?token=: remember it in a cookie and take it out of the address bar.
            kept = [(key, value) for key, value in request.query.items() if key != "token"]
            response = _see_other(str(request.rel_url.with_query(kept or None)))
            guard.set_cookie(request, response)
            return response
        return await handler(request)

    app.middlewares.append(check_origin)
    if guard.token is not None:
        app.middlewares.append(require_token)
    app.router.add_post("/api/login", guard.login)
