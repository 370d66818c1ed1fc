"""The hub's errors. Services raise these; ``mmanager.errors`` (the base both
sides share) turns them into ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from mmanager.errors import AppError
from mmanager.errors import error_response as error_response


class HubError(AppError):
    """Every error the hub answers; 400 ``BAD_REQUEST`` unless a subclass says otherwise."""


class Unauthorized(HubError):
    status_code = 401
    code = "UNAUTHORIZED"


class Forbidden(HubError):
    status_code = 403
    code = "FORBIDDEN"


class SpecForbidden(Forbidden):
    """A service spec the spec policy (``mmanager.policy``) refuses; details name the field and the rule."""

    code = "SPEC_FORBIDDEN"


class NotFound(HubError):
    status_code = 404
    code = "NOT_FOUND"


class Conflict(HubError):
    status_code = 409
    code = "CONFLICT"


class HubKeyMissing(Conflict):
    """A spec carries a secret (``registry_auth``, ``secrets``) and the hub has no key to seal it with."""

    code = "HUB_KEY_MISSING"


class SecretsUnavailable(Conflict):
    """A service's stored ``secrets`` do not open here (no hub key, or not the one they were sealed under):
    its container is not made without them."""

    code = "SECRETS_UNAVAILABLE"


class NoFeasibleController(Conflict):
    code = "NO_FEASIBLE_CONTROLLER"


class QuotaExceeded(Conflict):
    code = "QUOTA_EXCEEDED"


class RateLimited(HubError):
    status_code = 429
    code = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"retry_after": retry_after})
        self.headers = {"Retry-After": str(retry_after)}


class Overloaded(HubError):
    """The hub has more of this work waiting than it lets queue: retry after a moment."""

    status_code = 503
    code = "HUB_BUSY"

    def __init__(self, message: str, retry_after: int, *, code: str | None = None) -> None:
        super().__init__(message, {"retry_after": retry_after}, code=code)
        self.headers = {"Retry-After": str(retry_after)}


class TooManyLogStreams(HubError):
    status_code = 429
    code = "TOO_MANY_LOG_STREAMS"

    def __init__(self, message: str, details: Any, retry_after: int) -> None:
        super().__init__(message, {**details, "retry_after": retry_after})
        self.headers = {"Retry-After": str(retry_after)}


class InvalidRequest(HubError):
    status_code = 422
    code = "VALIDATION_ERROR"


class ControllerUnavailable(HubError):
    """A controller could not be reached or answered with a server error."""

    status_code = 502
    code = "CONTROLLER_UNAVAILABLE"


class ControllerTimedOut(ControllerUnavailable):
    """A controller took the call but did not answer it in time (a call not repeated: what it did is unknown)."""

    status_code = 504
    code = "CONTROLLER_TIMEOUT"


class ControllerRejected(HubError):
    """A controller refused the call with a 4xx; its code and status are passed on."""

    status_code = 422
    code = "CONTROLLER_REJECTED"
