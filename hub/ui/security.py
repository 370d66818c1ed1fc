"""What keeps the console safe as a web page: the session cookie, CSRF tokens, the Origin check and the
headers every ``/ui`` answer carries.

The session is the user's own API token in an HttpOnly, SameSite=Strict cookie on ``/ui`` (Secure over
https): page scripts cannot read it and it never appears in a URL. A change is a POST that carries, in
its form, the HMAC of that token (``csrf_token``), and comes from this origin (``same_origin``); both are
checked before anything is done (``check_post``). The token is derived, not stored: every hub replica
checks it the same, and a leaked form value does not reveal the session. Before a session exists (the
login form) the token is a random value also set as a SameSite=Strict cookie (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.errors import Forbidden

SESSION_COOKIE = "mm_session"
LOGIN_COOKIE = "mm_login"
COOKIE_PATH = "/ui"
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


def origin_of(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def same_origin(request: Request) -> bool:
    """Whether a POST comes from one of this console's pages: its Origin (every current browser sends one
    on a POST), else its Referer, names this origin. A request with neither is refused."""
    own = origin_of(request)
    origin = request.headers.get("origin")
    if origin is not None:
        return hmac.compare_digest(origin.encode(), own.encode())
    referer = request.headers.get("referer")
    return referer is not None and (referer == own or referer.startswith(own + "/"))


def check_post(request: Request, sent: object, expected: str) -> None:
    """``CsrfRefused`` unless the POST is same-origin and its form's token is ``expected``."""
    if not same_origin(request):
        raise CsrfRefused("this form was not sent from this console's pages (Origin or Referer)")
    if not isinstance(sent, str) or not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused("the form's CSRF token is missing or wrong; reload the page and try again")


def _cookie(response: Response, request: Request, name: str, value: str, path: str) -> None:
    response.set_cookie(name, value, path=path or COOKIE_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def set_session(response: Response, request: Request, token: str, path: str) -> None:
    """``path``: where the console is mounted; the cookie goes with its pages' requests only."""
    _cookie(response, request, SESSION_COOKIE, token, path)
    response.delete_cookie(LOGIN_COOKIE, path=path or COOKIE_PATH)


def set_login_nonce(response: Response, request: Request, nonce: str, path: str) -> None:
    _cookie(response, request, LOGIN_COOKIE, nonce, path)


def clear_session(response: Response, request: Request, path: str) -> None:
    response.delete_cookie(SESSION_COOKIE, path=path or COOKIE_PATH, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")


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
