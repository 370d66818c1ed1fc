"""What keeps the console safe as a web page: the session cookie, CSRF tokens, the Origin check and the
headers every ``/ui`` answer carries.

The session is the user's own API token in an HttpOnly, SameSite=Strict cookie with a bounded Max-Age, on
``/ui`` over http and ``__Host-`` prefixed over https (``Site``): page scripts cannot read it and it never
appears in a URL. Logging out drops the cookie; it does not revoke the token. A change is a POST that carries,
in its form, the HMAC of that token (``csrf_token``), and comes from the console's origin
(``Site.same_origin``); both are checked before anything is done (``Site.check_post``). The token is derived,
not stored: every hub replica checks it the same, and a leaked form value does not reveal the session. Before
a session exists (the login form) the token is a random value also set as a SameSite=Strict cookie (double
submit).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.errors import Forbidden

SESSION_COOKIE = "mm_session"
LOGIN_COOKIE = "mm_login"
COOKIE_PATH = "/ui"
# Over https (RFC 6265bis): the browser keeps such a cookie only if it is Secure, Path=/ and has no Domain.
HOST_PREFIX = "__Host-"
# The session cookie's default lifetime (MMANAGER_CONSOLE_SESSION_SECONDS), and the login form's nonce's.
SESSION_SECONDS = 12 * 3600
LOGIN_SECONDS = 3600
# What can be an API token: printable ASCII (it travels in an Authorization header), bounded.
MAX_TOKEN = 512
TOKEN_SHAPE = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN}}}")
DEFAULT_PORTS = {"http": 80, "https": 443}
CSRF_FIELD = "csrf"
_CSRF_CONTEXT = b"mmanager console csrf v1"

# No inline script or style anywhere: the console's one script and one stylesheet come from /ui/static,
# charts are SVG drawn with presentation attributes, and the live log is fetched from this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    # Same-origin requests keep their Referer (and a POST its Origin, which ``same_origin`` reads); other
    # sites get nothing.
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_NO_STORE = (b"cache-control", b"no-store")


class CsrfRefused(Forbidden):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="CSRF_REFUSED")


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def new_login_nonce() -> str:
    return secrets.token_urlsafe(32)


def well_formed(token: str) -> bool:
    """Whether ``token`` can be an API token at all: printable ASCII, at most ``MAX_TOKEN`` characters. Anything
    else cannot travel in an Authorization header, so it is refused (login) or treated as no session (cookie)."""
    return TOKEN_SHAPE.fullmatch(token) is not None


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` as a browser writes it in an Origin header: lower case, no default port."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" if port is None or DEFAULT_PORTS.get(scheme) == port else f"{scheme}://{host}:{port}"


class Site:
    """Where browsers reach the console, and so its origin and cookies.

    ``public_url`` (``MMANAGER_CONSOLE_URL``): the hub's URL as browsers reach it (behind a TLS-terminating
    proxy: its ``https://`` address). When set, a POST's Origin (or Referer) must name it and the cookies are
    Secure iff it is https; unset, the request's own scheme and host decide. Over https the cookies are
    ``__Host-`` prefixed (Secure, ``Path=/``, no Domain): a sibling subdomain cannot set or shadow them.
    ``session_seconds``: the session cookie's Max-Age.
    """

    def __init__(self, public_url: str = "", session_seconds: int = SESSION_SECONDS) -> None:
        self.public = _origin(public_url) if public_url.strip() else None
        self.session_seconds = session_seconds

    def origin(self, request: Request) -> str:
        return self.public or f"{request.url.scheme}://{request.url.netloc}"

    def secure(self, request: Request) -> bool:
        return (self.public or f"{request.url.scheme}:").startswith("https:")

    def same_origin(self, request: Request) -> bool:
        """Whether a POST comes from one of this console's pages: its Origin (every current browser sends one
        on a POST), else its Referer, names this origin. A request with neither is refused."""
        own = self.origin(request)
        origin = request.headers.get("origin")
        if origin is not None:
            return hmac.compare_digest(origin.encode(), own.encode())
        referer = request.headers.get("referer")
        return referer is not None and (referer == own or referer.startswith(own + "/"))

    def check_post(self, request: Request, sent: object, expected: str) -> None:
        """``CsrfRefused`` unless the POST is same-origin and its form's token is ``expected``."""
        if not self.same_origin(request):
            raise CsrfRefused("this form was not sent from this console's pages (Origin or Referer)")
        if not isinstance(sent, str) or not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise CsrfRefused("the form's CSRF token is missing or wrong; reload the page and try again")

    def _name(self, request: Request, name: str) -> str:
        return HOST_PREFIX + name if self.secure(request) else name

    def _path(self, request: Request, path: str) -> str:
        # A __Host- cookie must have Path=/; over http the cookie goes with the console's requests only.
        return "/" if self.secure(request) else path or COOKIE_PATH

    def session_token(self, request: Request) -> str | None:
        return request.cookies.get(self._name(request, SESSION_COOKIE))

    def login_nonce(self, request: Request) -> str | None:
        return request.cookies.get(self._name(request, LOGIN_COOKIE))

    def _set(self, response: Response, request: Request, name: str, value: str, path: str, max_age: int) -> None:
        response.set_cookie(self._name(request, name), value, max_age=max_age, path=self._path(request, path),
                            httponly=True, samesite="strict", secure=self.secure(request))

    def _delete(self, response: Response, request: Request, name: str, path: str) -> None:
        response.delete_cookie(self._name(request, name), path=self._path(request, path), httponly=True,
                               samesite="strict", secure=self.secure(request))

    def set_session(self, response: Response, request: Request, token: str, path: str) -> None:
        """``path``: where the console is mounted; over http the cookie goes with its pages' requests only."""
        self._set(response, request, SESSION_COOKIE, token, path, self.session_seconds)
        self._delete(response, request, LOGIN_COOKIE, path)

    def set_login_nonce(self, response: Response, request: Request, nonce: str, path: str) -> None:
        self._set(response, request, LOGIN_COOKIE, nonce, path, LOGIN_SECONDS)

    def clear_session(self, response: Response, request: Request, path: str) -> None:
        self._delete(response, request, SESSION_COOKIE, path)


class SecurityHeaders:
    """Adds ``HEADERS`` to every answer of ``app`` (the whole console, its errors and static files included),
    and ``Cache-Control: no-store`` to all but the static files: pages hold one user's data."""

    def __init__(self, app: ASGIApp, cached: Iterable[str] = ("/static/",)) -> None:
        self.app = app
        self.cached = tuple(cached)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        inner = path[len(root):] if root and path.startswith(root) else path
        extra = HEADERS if inner.startswith(self.cached) else [*HEADERS, _NO_STORE]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {extra_name for extra_name, _ in extra}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*headers, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
