"""The jobs API's shapes (docs/API.md, Jobs, Artifacts, Pipelines): batch jobs, their attempts, the
artifacts they read and write, and pipelines of jobs. Input models forbid unknown fields; output models are
what the API promises. A job's container sees its inputs read-only under ``/inputs`` and leaves its results
under ``/outputs``.
"""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from hub.schemas import NAME_PATTERN, Env, Resources, StrictModel
from mmanager.policy import command_problem
from mmanager.wire import JobProgress

JobStatus = Literal["pending", "running", "succeeded", "failed", "cancelled", "timed_out"]
AttemptStatus = Literal["starting", "running", "succeeded", "failed", "timed_out", "cancelled", "lost"]
PipelineStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
JOB_FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
ATTEMPT_LIVE: frozenset[str] = frozenset({"starting", "running"})

MAX_RETRIES = 10
MAX_PRIORITY = 100
MAX_TIMEOUT = 30 * 86400
MAX_INPUTS = 256
MAX_STEPS = 100
ID_PATTERN = r"^[0-9a-f]{32}$"


def _relative_path(value: str) -> str:
    """A '/'-separated path under ``/inputs`` or ``/outputs``: relative, no empty, ``.`` or ``..`` segment."""
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in value:
        raise PydanticCustomError("bad_path", "a path must be relative, '/'-separated, without '.', '..' or "
                                              "empty segments")
    return posixpath.normpath(value)


RelativePath = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_relative_path)]


def _argv(value: list[str]) -> list[str]:
    problem = command_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Argv = Annotated[list[Annotated[str, Field(max_length=65536)]], Field(max_length=4096), AfterValidator(_argv)]


class ArtifactInput(StrictModel):
    """An artifact (an upload, or an output of a finished job) by id; mounted at ``/inputs/{path}``, by
    default its name."""

    artifact: str = Field(pattern=ID_PATTERN)
    path: RelativePath | None = None


class JobOutputInput(StrictModel):
    """A file another job leaves under ``/outputs`` (``path``), mounted at ``/inputs/{as or path}``; the job
    waits until that job has succeeded."""

    job: str = Field(pattern=ID_PATTERN)
    path: RelativePath
    as_: RelativePath | None = Field(default=None, alias="as")


class StepOutputInput(StrictModel):
    """In a pipeline: a file an earlier step leaves under ``/outputs``; the step then needs that step."""

    step: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    path: RelativePath
    as_: RelativePath | None = Field(default=None, alias="as")


InputRef = Annotated[str, Field(pattern=ID_PATTERN)] | ArtifactInput | JobOutputInput


class JobSpec(StrictModel):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    # The argv run in the container (the image's entrypoint and command when empty); ``args`` are appended.
    command: Argv = Field(default_factory=list)
    args: Argv = Field(default_factory=list)
    env: Env = Field(default_factory=dict)
    inputs: list[InputRef] = Field(default_factory=list, max_length=MAX_INPUTS)
    resources: Resources = Field(default_factory=Resources)
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    # Attempts after a failed or timed-out one, each after a backoff.
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    # Seconds an attempt may run before its container is stopped (timed_out); None: no limit.
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT)
    # Higher runs first.
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)


class PipelineStep(JobSpec):
    """A job of a pipeline: a JobSpec whose inputs may also name an earlier step's output, and which may need
    other steps without taking their outputs."""

    inputs: list[InputRef | StepOutputInput] = Field(default_factory=list, max_length=MAX_INPUTS)  # type: ignore[assignment]
    needs: list[Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_STEPS)


class PipelineSpec(StrictModel):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    steps: list[PipelineStep] = Field(min_length=1, max_length=MAX_STEPS)

    @model_validator(mode="after")
    def _unique_steps(self) -> PipelineSpec:
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise PydanticCustomError("duplicate_step", "two steps are named {name}", {"name": step.name})
            seen.add(step.name)
        return self


class AttemptOut(BaseModel):
    number: int
    controller_id: str
    status: AttemptStatus
    exit_code: int | None = None
    error: str | None = None
    log_size: int = 0
    progress: JobProgress | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobOut(BaseModel):
    id: str
    name: str
    owner: str
    spec: dict[str, Any]
    status: JobStatus
    # Why it waits (the placement's verdict), or why it ended so.
    status_message: str | None = None
    # While pending for want of room: each controller's reason, [{controller_id, reason}].
    wait_reasons: list[dict[str, Any]] | None = None
    priority: int
    retries: int
    timeout: float | None = None
    exit_code: int | None = None
    progress: JobProgress | None = None
    pipeline_id: str | None = None
    step: str | None = None
    needs: list[str] = Field(default_factory=list)
    attempts: list[AttemptOut] = Field(default_factory=list)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ArtifactOut(BaseModel):
    id: str
    # An upload's name, or the output's path under /outputs.
    path: str
    size: int
    sha256: str
    owner: str
    job_id: str | None = None
    attempt: int | None = None
    # Where its bytes are downloaded: ``/api/artifacts/{id}/content``.
    url: str
    created_at: datetime


class PipelineOut(BaseModel):
    id: str
    name: str
    owner: str
    spec: dict[str, Any]
    status: PipelineStatus
    # The jobs of its steps, in the spec's order.
    steps: list[JobOut] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
