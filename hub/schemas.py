"""The hub's public API shapes (SPEC section 3). Input models forbid unknown
fields; output models are what the API promises."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmanager.wire import LABEL_PREFIX, parse_memory

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_MEMORY = 4 * 1024**4  # 4 TiB: no server in a lab has more
MAX_CPUS = 1024.0
MAX_GPUS = 16


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(StrictModel):
    cpu_limit: float | None = Field(default=None, gt=0, le=MAX_CPUS)
    memory_limit: str | None = Field(default=None, max_length=32)
    gpu_required: bool = False
    gpu_count: int = Field(default=0, ge=0, le=MAX_GPUS)

    @field_validator("memory_limit")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        size = parse_memory(value)
        if size < 4 * 1024**2:
            raise ValueError("memory_limit must be at least 4MB (Docker's minimum is 6MB of headroom)")
        if size > MAX_MEMORY:
            raise ValueError("memory_limit is larger than any server (at most 4TB)")
        return value

    @model_validator(mode="after")
    def _gpu(self) -> Resources:
        if self.gpu_required and self.gpu_count == 0:
            self.gpu_count = 1
        if self.gpu_count > 0:
            self.gpu_required = True
        return self

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory_limit) if self.memory_limit else 0


class HealthCheckSpec(StrictModel):
    path: str = Field(default="/health", pattern=r"^/", max_length=512)
    port: int = Field(ge=1, le=65535)
    interval: float = Field(default=5.0, gt=0, le=3600)
    timeout: float = Field(default=3.0, gt=0, le=600)
    # Consecutive failed probes that make the service unhealthy (then restarted in place).
    failure_threshold: int = Field(default=3, ge=1, le=100)
    # Seconds after a start during which failures do not count, unless a probe has passed.
    start_period: float = Field(default=30.0, ge=0, le=3600)


PortKey = str


class ServiceSpec(StrictModel):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: str | list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    ports: dict[PortKey, int | None] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    health_check: HealthCheckSpec | None = None
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] = "unless-stopped"
    volumes: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or "=" in key or "\x00" in key or len(key) > 256:
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for key, host in value.items():
            number, _, proto = key.partition("/")
            if not number.isdigit() or not 1 <= int(number) <= 65535 or proto not in ("", "tcp", "udp"):
                raise ValueError(f"invalid container port {key!r}: use e.g. '5000' or '5000/udp'")
            if host is not None and not 1 <= host <= 65535:
                raise ValueError(f"invalid host port {host} for {key!r}")
            out[key] = host
        return out

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
                raise ValueError(f"volume {name!r}: only named volumes (letters, digits, _ . -) are allowed")
            if not path.startswith("/"):
                raise ValueError(f"volume {name!r}: the mount path must be absolute")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(LABEL_PREFIX):
                raise ValueError(f"label {key!r}: the {LABEL_PREFIX}* labels are set by mManager only")
        return value


class ServicePatch(StrictModel):
    """A change of spec: the given fields replace the current ones."""

    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: str | list[str] | None = None
    env: dict[str, str] | None = None
    ports: dict[str, int | None] | None = None
    resources: Resources | None = None
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    health_check: HealthCheckSpec | None = None
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] | None = None
    volumes: dict[str, str] | None = None
    labels: dict[str, str] | None = None


class RollbackRequest(StrictModel):
    version: int = Field(ge=1)


class MigrateRequest(StrictModel):
    target_controller: str | None = None


class Endpoint(BaseModel):
    host: str
    ports: dict[str, int | None]


class ServiceOut(BaseModel):
    id: str
    name: str
    owner: str
    repo: str
    spec: dict[str, Any]
    version: int
    desired_state: Literal["running", "stopped"]
    status: str
    status_message: str | None
    controller_id: str | None
    container_id: str | None
    epoch: int
    endpoint: Endpoint | None
    url: str | None
    health: str
    created_at: datetime
    updated_at: datetime


class ControllerIn(StrictModel):
    id: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    url: str = Field(min_length=1, max_length=512, pattern=r"^https?://[^\s/]+(:\d+)?/?$")
    server_type: Literal["gpu", "cpu", "edge"] = "cpu"
    enabled: bool = True
    priority: int = Field(default=1, ge=0, le=1000)
    weight: int = Field(default=100, ge=1, le=10000)


class ControllerOut(BaseModel):
    id: str
    url: str
    server_type: str
    enabled: bool
    priority: int
    weight: int
    status: Literal["healthy", "unhealthy", "unknown", "draining"]
    last_heartbeat_at: datetime | None
    max_containers: int
    containers_running: int
    load_percentage: float
    memory_usage_percent: float
    gpus: list[Any]
    error: str | None


class OperationOut(BaseModel):
    id: str
    service_id: str | None
    controller_id: str | None
    container_id: str | None
    operation: str
    status: str
    error: str | None
    actor: str
    details: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None


class RegistryOut(BaseModel):
    id: str
    service_id: str
    controller_id: str
    container_id: str | None
    container_name: str
    image: str
    status: str
    epoch: int
    created_at: datetime
    updated_at: datetime


class DeploymentOut(BaseModel):
    version: int
    spec: dict[str, Any]
    image: str
    reason: str
    actor: str
    created_at: datetime
    current: bool


class UserIn(StrictModel):
    username: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    is_admin: bool = False


class UserCreated(BaseModel):
    username: str
    is_admin: bool
    token: str
