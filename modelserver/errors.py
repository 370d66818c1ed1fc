"""The service's refusals: one hierarchy, each class with seed 000's error code and its HTTP status.

Handlers and the model code raise these; ``app.py`` maps them to the error envelope in one place."""

from __future__ import annotations


class ServiceError(Exception):
    code = "INTERNAL_ERROR"
    status = 500
    message = "Internal server error"

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class InvalidRequest(ServiceError):
    code = "INVALID_REQUEST"
    status = 400
    message = "Invalid request parameters"


class BodyTooLarge(InvalidRequest):
    """A body over ``MODEL_MAX_BODY_BYTES``: seed 000's ``INVALID_REQUEST`` code, with HTTP's own status for it."""

    status = 413
    message = "Request body too large"


class InvalidSequence(ServiceError):
    code = "INVALID_SEQUENCE"
    status = 400
    message = "Invalid sequence format"


class SequenceTooLong(ServiceError):
    code = "SEQUENCE_TOO_LONG"
    status = 400
    message = "Sequence exceeds the length limit"


class ModelNotLoaded(ServiceError):
    code = "MODEL_NOT_LOADED"
    status = 503
    message = "Model not loaded"


class PredictionFailed(ServiceError):
    code = "PREDICTION_FAILED"
    status = 500
    message = "Prediction failed"


class InternalError(ServiceError):
    pass
