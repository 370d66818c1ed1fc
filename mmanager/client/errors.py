"""The SDK's one error, ``ApiError``: what the hub (or a service behind the gateway) refused, with its code.

Invariant: every failure a call of ``mmanager.client`` meets reaches its caller as an ``ApiError``; a hub
that cannot be reached is ``HUB_UNREACHABLE``, with status 0 (no HTTP answer carried it).
"""

from __future__ import annotations

from typing import Any

HUB_UNREACHABLE = "HUB_UNREACHABLE"


class ApiError(Exception):
    """``status``: the HTTP status of the answer that carried the error; 0 when none did (the hub could not
    be reached, an operation waited for failed, no profile is configured). ``str(e)`` is ``CODE: message``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __repr__(self) -> str:
        return f"ApiError(status={self.status}, code={self.code!r}, message={self.message!r})"


def from_answer(status: int, body: Any, text: str) -> ApiError:
    """The error an answer of ``status`` carries: the hub's envelope ``{"error": {code, message, details}}``,
    the model server's ``{"success": false, "message", "error": {code, details}}``, or just the status."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        message = error.get("message") or body.get("message") or ""
        return ApiError(status, error["code"], str(message), error.get("details"))
    return ApiError(status, f"HTTP_{status}", text.strip()[:500] or f"the answer was HTTP {status}")


def from_operation_error(error: str | None, details: Any = None) -> ApiError:
    """A failed operation's ``error`` (``CODE: message``) as an ``ApiError``."""
    code, sep, message = (error or "").partition(": ")
    if not sep or not code.replace("_", "").isalnum() or not code.isupper():
        code, message = "OPERATION_FAILED", error or "the operation failed"
    return ApiError(0, code, message, details)
