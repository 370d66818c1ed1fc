"""The controller's errors.

Everything below the routers raises these (never ``HTTPException``); the
handlers of ``mmanager.errors`` (the base both sides share) turn them into
``{"error": {"code", "message", "details"}}`` with the class's status.
"""

from __future__ import annotations

from typing import Any

from mmanager.errors import AppError


class ControllerError(AppError):
    """Every error the controller answers; 400 ``BAD_REQUEST`` unless a subclass says otherwise."""


class Unauthorized(ControllerError):
    status_code = 401
    code = "UNAUTHORIZED"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ControllerError):
    status_code = 404
    code = "NOT_FOUND"


class ImageNotFound(NotFound):
    code = "IMAGE_NOT_FOUND"


class ImageNotPresent(ImageNotFound):
    """Docker's create found no such image on this host, for a reference a registry may have.

    ``ContainerService.create`` pulls it (``Runtime.pull_missing``) and creates again; answered as
    IMAGE_NOT_FOUND only where nothing pulls.
    """


class Conflict(ControllerError):
    status_code = 409
    code = "CONFLICT"


class NameConflict(Conflict):
    code = "NAME_CONFLICT"


class CapacityExceeded(Conflict):
    code = "CAPACITY_EXCEEDED"


class StaleEpoch(Conflict):
    code = "STALE_EPOCH"


class GpuUnavailable(Conflict):
    code = "GPU_UNAVAILABLE"


class JobRunNotFound(NotFound):
    code = "JOB_RUN_NOT_FOUND"


class JobRunning(Conflict):
    """The attempt's container has not ended yet: its outputs are not listed until it has."""

    code = "JOB_RUNNING"


class JobDirUnwritable(ControllerError):
    """``MMANAGER_JOB_DIR`` cannot be written (missing permissions, a full disk): the run is not made."""

    status_code = 507
    code = "JOB_DIR_UNWRITABLE"


class InvalidPath(ControllerError):
    """A job's input or output path that is absolute, climbs out with ``..`` or has an empty segment."""

    code = "INVALID_PATH"


class ImageInUse(Conflict):
    code = "IMAGE_IN_USE"


class ContainerNotRunning(Conflict):
    code = "CONTAINER_NOT_RUNNING"


class PathConflict(Conflict):
    """A copy would put a file where the container has a folder, or a folder where it has a file: refused,
    because a copy never removes what it did not name."""

    code = "PATH_CONFLICT"


class PathIsDirectory(PathConflict):
    """A file copy whose ``container_path`` is an existing folder, with no ``file_name`` to write inside it."""

    code = "PATH_IS_DIRECTORY"


class InvalidRequest(ControllerError):
    status_code = 422
    code = "VALIDATION_ERROR"


class SpecForbidden(ControllerError):
    """The spec asks for something ``mmanager.policy`` refuses (privileges, host namespaces, host paths...)."""

    status_code = 403
    code = "SPEC_FORBIDDEN"


class InvalidContainerConfig(InvalidRequest):
    """Docker refused the configuration itself (a 400 from the daemon)."""

    code = "INVALID_CONTAINER_CONFIG"


class StartFailed(InvalidRequest):
    """The container was created but would not start; it has been removed again."""

    code = "START_FAILED"


class CopyFailed(InvalidRequest):
    code = "COPY_FAILED"


class DockerError(ControllerError):
    """The daemon answered with a server error."""

    status_code = 502
    code = "DOCKER_ERROR"


class ImagePullFailed(DockerError):
    code = "IMAGE_PULL_FAILED"

    def envelope(self) -> dict[str, Any]:
        # GeoML-Hub reads a pull's outcome from ``status``; say it in the body too.
        return {"status": "error", "message": self.message, **super().envelope()}


class TooManyLogStreams(ControllerError):
    """``MMANAGER_MAX_LOG_STREAMS`` followed logs are open already; one ending frees a slot."""

    status_code = 429
    code = "TOO_MANY_LOG_STREAMS"
    headers = {"Retry-After": "5"}


class DockerUnavailable(ControllerError):
    status_code = 503
    code = "DOCKER_UNAVAILABLE"


class ControllerNotSynced(ControllerError):
    """Heartbeats on, and no round trip with the hub (stop orders applied) within the grace.

    A controller that was cut off (partitioned, or frozen by SIGSTOP) may still
    run copies the hub has since moved elsewhere; it takes no new work until
    a heartbeat has told it which to remove and it has removed them.
    """

    status_code = 503
    code = "CONTROLLER_NOT_SYNCED"
    headers = {"Retry-After": "2"}


class ModelSyncFailed(ControllerError):
    """A model file could not be fetched from the hub into this controller's cache (no hub URL, the hub
    unreachable, the file not in its store, the cache full of files in use): the container is not made.
    424, not a 5xx: the hub's client retries those, and the controller has already tried every hub it knows."""

    status_code = 424
    code = "MODEL_SYNC_FAILED"


class ModelChecksumMismatch(ModelSyncFailed):
    """The bytes fetched for a model file do not hash to its digest: they were dropped, never used."""

    code = "MODEL_CHECKSUM_MISMATCH"


class ModelCacheFull(ModelSyncFailed):
    """The file does not fit in ``MMANAGER_MODEL_CACHE_BYTES`` even after evicting every file no container uses."""

    status_code = 507
    code = "MODEL_CACHE_FULL"
