"""The hub's public API shapes (docs/API.md). Input models forbid unknown
fields; output models are what the API promises."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mmanager.policy import MAX_ENV_VALUE_BYTES, command_problem, environment_problem, labels_problem
from mmanager.wire import parse_memory

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_MEMORY = 4 * 1024**4  # 4 TiB: no server in a lab has more
MAX_CPUS = 1024.0
MAX_GPUS = 16
MAX_GPU_MEMORY = 1024**4


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unset(value: Any) -> bool:
    return value is None


class Resources(StrictModel):
    cpu_limit: float | None = Field(default=None, gt=0, le=MAX_CPUS)
    memory_limit: str | None = Field(default=None, max_length=32)
    gpu_required: bool = False
    gpu_count: int = Field(default=0, ge=0, le=MAX_GPUS)
    # Only GPUs whose model name contains this, case-insensitively ("A100" matches "NVIDIA A100-SXM4-80GB").
    # The three are left out of the output when not given: specs stored before them read the same.
    gpu_model: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
                                  exclude_if=_unset)
    # Only GPUs with at least this much VRAM each ("40GB").
    gpu_min_memory: str | None = Field(default=None, max_length=32, exclude_if=_unset)
    # A VRAM budget on one shared GPU ("8GB") instead of whole GPUs.
    gpu_memory: str | None = Field(default=None, max_length=32, exclude_if=_unset)

    @field_validator("gpu_min_memory", "gpu_memory")
    @classmethod
    def _vram(cls, value: str | None) -> str | None:
        if value is None:
            return None
        size = parse_memory(value)
        if size < 64 * 1024**2:
            raise PydanticCustomError("gpu_memory_too_small", "a VRAM size must be at least 64MB")
        if size > MAX_GPU_MEMORY:
            raise PydanticCustomError("gpu_memory_too_large", "a VRAM size is larger than any GPU (at most 1TB)")
        return value

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
        if self.gpu_memory is not None:
            # A share of one GPU, never whole ones too: placement keeps the two kinds of GPU apart.
            if self.gpu_count > 0:
                raise PydanticCustomError("gpu_memory_with_gpu_count",
                                          "gpu_memory (a share of one GPU) excludes gpu_count (whole GPUs)")
            self.gpu_required = True
            return self
        if (self.gpu_model is not None or self.gpu_min_memory is not None) and self.gpu_count == 0:
            self.gpu_required = True
        if self.gpu_required and self.gpu_count == 0:
            self.gpu_count = 1
        if self.gpu_count > 0:
            self.gpu_required = True
        return self

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory_limit) if self.memory_limit else 0

    @property
    def gpu_memory_bytes(self) -> int:
        return parse_memory(self.gpu_memory) if self.gpu_memory else 0

    @property
    def gpu_min_memory_bytes(self) -> int:
        return parse_memory(self.gpu_min_memory) if self.gpu_min_memory else 0


class HealthCheckSpec(StrictModel):
    path: str = Field(default="/health", pattern=r"^/", max_length=512)
    port: int = Field(ge=1, le=65535)
    interval: float = Field(default=5.0, gt=0, le=3600)
    timeout: float = Field(default=3.0, gt=0, le=600)
    # Consecutive failed probes that make the service unhealthy (then restarted in place).
    failure_threshold: int = Field(default=3, ge=1, le=100)
    # Seconds after a start during which failures do not count, unless a probe has passed.
    start_period: float = Field(default=30.0, ge=0, le=3600)


# The most a golden-inference probe's body, and its expected answer, may take as JSON.
MAX_PROBE_JSON = 64 * 1024


def _json_capped(value: Any) -> Any:
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except ValueError:
        raise ValueError("must be plain JSON (no NaN or infinity)") from None
    if size > MAX_PROBE_JSON:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_PROBE_JSON}")
    return value


class ProbeSpec(StrictModel):
    """A golden-inference probe (docs/API.md): ``body`` POSTed as JSON to ``path`` on the health check's
    port once after each start; the answer must match ``expect`` (numbers within ``tolerance``)."""

    path: str = Field(pattern=r"^/", max_length=512)
    body: Annotated[dict[str, Any], AfterValidator(_json_capped)]
    expect: Annotated[Any, AfterValidator(_json_capped)]
    tolerance: float = Field(default=1e-4, ge=0, allow_inf_nan=False)


PortKey = str


def _env(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not key or "=" in key or "\x00" in key or len(key) > 256:
            raise ValueError(f"invalid environment variable name {key[:64]!r}")
    problem = environment_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    # Reserved mmanager.* keys are the spec policy's to refuse (403 SPEC_FORBIDDEN), not a shape problem.
    problem = labels_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _command(value: str | list[str] | None) -> str | list[str] | None:
    problem = command_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _ports(value: dict[str, int | None]) -> dict[str, int | None]:
    for key, host in value.items():
        number, _, proto = key.partition("/")
        if not number.isdigit() or not 1 <= int(number) <= 65535 or proto not in ("", "tcp", "udp"):
            raise ValueError(f"invalid container port {key[:32]!r}: use e.g. '5000' or '5000/udp'")
        if host is not None and not 1 <= host <= 65535:
            raise ValueError(f"invalid host port {host} for {key!r}")
    return value


def _volumes(value: dict[str, str]) -> dict[str, str]:
    # Which sources may be mounted (named volumes; allow-listed host paths) is the spec policy's call.
    for source, path in value.items():
        if not source or len(source) > 4096 or "\x00" in source:
            raise ValueError("a volume is a name (letters, digits, _ . -) or an absolute host path")
        if not path.startswith("/") or len(path) > 4096 or "\x00" in path:
            raise ValueError(f"volume {source[:64]!r}: the mount path must be absolute")
    return value


Env = Annotated[dict[str, str], AfterValidator(_env)]

# A secret's name is an environment variable's name (the container gets it as one).
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_SECRETS = 64
MAX_SECRET_NAME = 128


def _secrets(value: Any) -> Any:
    """Names that are environment variable names, values that Docker can carry, as ``SecretStr``s. Run
    before pydantic's own checks of the map, whose errors would be located at the offending key: a value
    pasted where its name goes would be echoed in the 422, the audit log and the console. So no error here
    quotes a value, nor a name that is not a name: names are checked first, and reported by position."""
    if not isinstance(value, dict):
        return value  # pydantic refuses it as no map (its error quotes no key)
    for position, name in enumerate(value, 1):
        if not isinstance(name, str) or len(name) > MAX_SECRET_NAME or not SECRET_NAME.fullmatch(name):
            raise PydanticCustomError(
                "secret_name_invalid", "secret {position} of the map is not named as an environment variable "
                "([A-Za-z_][A-Za-z0-9_]*, at most {limit} characters)", {"position": position, "limit": MAX_SECRET_NAME})
    out: dict[str, SecretStr] = {}
    for name, secret in value.items():
        if isinstance(secret, SecretStr):
            secret = secret.get_secret_value()
        if not isinstance(secret, str):
            raise PydanticCustomError("secret_value_invalid", "secret {name}: the value must be a string",
                                      {"name": name})
        try:
            size = len(secret.encode())
        except UnicodeEncodeError:
            raise PydanticCustomError("secret_value_invalid", "secret {name}: not valid Unicode text (UTF-8)",
                                      {"name": name}) from None
        if "\x00" in secret:
            raise PydanticCustomError("secret_value_invalid", "secret {name}: holds a NUL character, which no "
                                      "environment variable can", {"name": name})
        if size > MAX_ENV_VALUE_BYTES:
            raise PydanticCustomError("secret_value_invalid", "secret {name}: larger than {limit} bytes",
                                      {"name": name, "limit": MAX_ENV_VALUE_BYTES})
        out[name] = SecretStr(secret)
    return out


# A spec's secrets: name -> value, write-only (hub.services.secrets). Checked whole before pydantic's checks
# (``_secrets``), which then find only string names and SecretStr values.
Secrets = Annotated[dict[str, SecretStr], Field(max_length=MAX_SECRETS), BeforeValidator(_secrets)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Command = Annotated[str | list[str] | None, AfterValidator(_command)]
Ports = Annotated[dict[PortKey, int | None], Field(max_length=64), AfterValidator(_ports)]
Volumes = Annotated[dict[str, str], Field(max_length=64), AfterValidator(_volumes)]
def _body_size(value: str) -> str:
    size = parse_memory(value)
    if size > MAX_BODY:
        raise ValueError("max_body_size is at most 1GB")
    return value


MAX_BODY = 1024**3
MAX_RATE_LIMIT = 1_000_000
MAX_IDLE_TIMEOUT = 30 * 86400
# The most replicas a spec may name at all; MMANAGER_MAX_REPLICAS caps it lower.
MAX_REPLICAS = 1000
MaxBody = Annotated[str, Field(max_length=32), AfterValidator(_body_size)]
# Checked against mmanager.policy.ALLOWED_CAPABILITIES by the spec policy.
Capabilities = Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z_]{1,64}$")]], Field(max_length=32)]


class CpuFallback(StrictModel):
    """The CPU variant of a GPU service: its image and resources, run where no GPU fits; its own command and
    environment (merged over the service's ``env``, its keys winning) if given, and its own golden-inference
    probe: none unless given (a CPU backend need not give a GPU model's golden answers)."""

    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    resources: Resources = Field(default_factory=Resources)
    command: Command = Field(default=None, exclude_if=_unset)
    env: Env | None = Field(default=None, exclude_if=_unset)
    probe: ProbeSpec | None = Field(default=None, exclude_if=_unset)

    @model_validator(mode="after")
    def _no_gpu(self) -> CpuFallback:
        r = self.resources
        if r.gpu_required or r.gpu_count or r.gpu_model or r.gpu_min_memory or r.gpu_memory:
            raise PydanticCustomError("cpu_fallback_gpu", "cpu_fallback.resources may not ask for a GPU")
        return self


class RegistryAuthIn(StrictModel):
    """A service's registry credentials (``registry_auth``): write-only. Never dumped with its spec (the
    field is excluded), kept sealed under the hub key (``hub.services.registry_auth``)."""

    username: str = Field(min_length=1, max_length=255)
    password: SecretStr = Field(min_length=1, max_length=4096)

    @field_validator("username", "password", mode="after")
    @classmethod
    def _utf8(cls, value: str | SecretStr) -> str | SecretStr:
        # A lone surrogate passes as a str but not as UTF-8 (its seal, the wire): refused here, not echoed.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        try:
            text.encode()
        except UnicodeEncodeError:
            raise PydanticCustomError("registry_auth_not_utf8",
                                      "registry credentials must be valid Unicode text (UTF-8)") from None
        return value


DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
# Where a model file is mounted when its entry names no mount: this directory, under the file's name in the store.
MODEL_DIR = "/app/models"
MAX_MODELS = 32


def _empty(value: Any) -> bool:
    return not value


class ModelMount(StrictModel):
    """A file of the hub's model-file store (``POST /api/model-files``), mounted read-only in the container."""

    digest: str = Field(pattern=DIGEST_PATTERN)
    # None: MODEL_DIR/{the file's name in the store}, filled in when the spec is accepted.
    mount: str | None = Field(default=None, min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")

    @field_validator("mount")
    @classmethod
    def _plain_path(cls, value: str | None) -> str | None:
        if value is not None and (value.endswith("/") or any(part in (".", "..") for part in value.split("/"))):
            raise ValueError("a model's mount is an absolute file path, without '.' or '..' parts or a trailing '/'")
        return value


def _models(value: list[ModelMount]) -> list[ModelMount]:
    mounts = [model.mount for model in value if model.mount is not None]
    if len(set(mounts)) != len(mounts):
        raise ValueError("two models are mounted at the same path")
    digests = [model.digest for model in value]
    if len(set(digests)) != len(digests):
        raise ValueError("a model file is named twice")
    return value


Models = Annotated[list[ModelMount], Field(max_length=MAX_MODELS), AfterValidator(_models)]


class ServiceSpec(StrictModel):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: Command = None
    env: Env = Field(default_factory=dict)
    ports: Ports = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    health_check: HealthCheckSpec | None = None
    # Checked once after each start, on the health check's port (so a probe needs a health_check).
    probe: ProbeSpec | None = None
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] = "unless-stopped"
    volumes: Volumes = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    cap_add: Capabilities = Field(default_factory=list)
    # At the gateway (docs/API.md, The gateway): a key needed, requests a minute per client IP, the body size.
    private: bool = False
    rate_limit_per_minute: int = Field(default=100, ge=0, le=MAX_RATE_LIMIT)
    max_body_size: MaxBody = "10MB"
    # Seconds without gateway traffic before the service is stopped as idle; None: MMANAGER_SERVICE_IDLE_TIMEOUT.
    idle_timeout: int | None = Field(default=None, ge=0, le=MAX_IDLE_TIMEOUT)
    # Copies of the container, spread over controllers, behind one gateway route.
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    # The model type (GET /api/models) the service was made from: shown, never followed after the create.
    model: str | None = Field(default=None, min_length=1, max_length=63, pattern=NAME_PATTERN)
    # Write-only: sealed into the service's row, never part of the stored or shown spec (exclude).
    registry_auth: RegistryAuthIn | None = Field(default=None, exclude=True)
    # Write-only, as registry_auth: environment variables of the container, sealed into the service's row.
    secrets: Secrets | None = Field(default=None, exclude=True)
    # The CPU variant run when no GPU fits (docs/API.md, CPU fallback); left out of the output when not given.
    cpu_fallback: CpuFallback | None = Field(default=None, exclude_if=_unset)

    @model_validator(mode="after")
    def _fallback_needs_gpu(self) -> ServiceSpec:
        if self.cpu_fallback is not None and not self.resources.gpu_required:
            raise PydanticCustomError("cpu_fallback_without_gpu",
                                      "cpu_fallback is only for a service whose resources ask for a GPU")
        if self.cpu_fallback is not None and self.health_check is None:
            # The move back to a GPU routes the new copy once its health check passes: without one it
            # would route a copy still loading its model.
            raise PydanticCustomError("cpu_fallback_needs_health_check",
                                      "cpu_fallback needs a health_check (the move back to a GPU waits for it)")
        return self
    # Files of the model-file store, mounted read-only (left out of the output when none: specs stored before
    # read the same).
    models: Models = Field(default_factory=list, exclude_if=_empty)
    # Pre-pull the image onto the controllers a failover would pick next (hub.background.prefetch); left out of
    # the output when false (specs stored before read the same).
    prefetch: bool = Field(default=False, exclude_if=_empty)


class ServiceCreate(ServiceSpec):
    """A create's body: a ServiceSpec, except that with ``model`` the image may be left out too, and every
    field left out comes from that model type (``hub.services.catalog.model_spec``)."""

    # Optional here only: the spec a service is made with always has one (``model_spec`` fills it in).
    image: str | None = Field(  # type: ignore[assignment]
        default=None, min_length=1, max_length=512, pattern=r"^[^\s]+$")

    @model_validator(mode="after")
    def _image_or_model(self) -> ServiceCreate:
        if self.image is None and self.model is None:
            raise ValueError("image is required, unless model names a model type (GET /api/models)")
        return self


class ServicePatch(StrictModel):
    """A change of spec: the given fields replace the current ones."""

    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: Command = None
    env: Env | None = None
    ports: Ports | None = None
    resources: Resources | None = None
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    health_check: HealthCheckSpec | None = None
    # Replaced whole (its body and expected answer are the user's JSON, not merged).
    probe: ProbeSpec | None = None
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] | None = None
    volumes: Volumes | None = None
    labels: Labels | None = None
    cap_add: Capabilities | None = None
    private: bool | None = None
    rate_limit_per_minute: int | None = Field(default=None, ge=0, le=MAX_RATE_LIMIT)
    max_body_size: MaxBody | None = None
    idle_timeout: int | None = Field(default=None, ge=0, le=MAX_IDLE_TIMEOUT)
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)
    # Sets or replaces the credentials; null clears them. Never part of the spec (exclude).
    registry_auth: RegistryAuthIn | None = Field(default=None, exclude=True)
    # Replaces the whole map (a new version, rolled out); null clears it. Never part of the spec (exclude).
    secrets: Secrets | None = Field(default=None, exclude=True)
    cpu_fallback: CpuFallback | None = None
    models: Models | None = None
    prefetch: bool | None = None


class RollbackRequest(StrictModel):
    version: int = Field(ge=1)


class MigrateRequest(StrictModel):
    target_controller: str | None = None
    # Move even though the service's volumes stay on the controller it leaves (else 409 VOLUME_STAYS_BEHIND).
    leave_volumes: bool = False
    # The replica to move (``POST /api/services/{id}/migrate``): an id from the status's ``replicas``;
    # default the primary copy.
    replica: str | None = Field(default=None, min_length=1, max_length=128)


class Endpoint(BaseModel):
    host: str
    ports: dict[str, int | None]


class ReplicaOut(BaseModel):
    """One copy of a service: its container (or, while it is being made, its registry row's id)."""

    id: str
    controller_id: str
    state: str
    health: str
    # Why the copy is unhealthy (a golden-inference probe's wrong answer, the last failed check); else null.
    health_detail: str | None = None
    endpoint: Endpoint | None
    # "cpu_fallback" while this copy runs the spec's CPU variant; else "main".
    variant: Literal["main", "cpu_fallback"] = "main"


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
    # The primary copy's health_detail.
    health_detail: str | None = None
    replicas: list[ReplicaOut]
    created_at: datetime
    updated_at: datetime
    # "cpu_fallback" while the primary copy runs the spec's CPU variant (no GPU fitted); else "main".
    variant: Literal["main", "cpu_fallback"] = "main"


CONTROLLER_URL = r"^https?://[^\s/]+(:\d+)?/?$"
MAX_CONTAINERS_CAP = 100_000


def reachable_url(url: str) -> str:
    """A controller URL the hub's client can call: the pattern's shape, and a host and port that parse
    (``http://[`` has the shape, and no client could reach it)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise PydanticCustomError("controller_url", "not a URL the hub can reach: a host, an optional port") \
            from None
    if not parts.hostname:
        raise PydanticCustomError("controller_url", "not a URL the hub can reach: a host, an optional port")
    return url


ControllerUrl = Annotated[str, Field(min_length=1, max_length=512, pattern=CONTROLLER_URL),
                          AfterValidator(reachable_url)]


class ControllerIn(StrictModel):
    id: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    url: ControllerUrl
    server_type: Literal["gpu", "cpu", "edge"] = "cpu"
    enabled: bool = True
    priority: int = Field(default=1, ge=0, le=1000)
    weight: int = Field(default=100, ge=1, le=10000)


class ControllerPatch(StrictModel):
    """``PATCH /api/admin/controllers/{id}``: the fields given change, within ``ControllerIn``'s bounds.
    ``max_containers`` is the admin's cap on what the hub places there (the controller's own
    ``MAX_CONTAINERS`` still binds); null lifts it."""

    priority: int | None = Field(default=None, ge=0, le=1000)
    weight: int | None = Field(default=None, ge=1, le=10000)
    max_containers: int | None = Field(default=None, ge=1, le=MAX_CONTAINERS_CAP)
    server_type: Literal["gpu", "cpu", "edge"] | None = None
    url: ControllerUrl | None = None

    @model_validator(mode="after")
    def _something_and_no_nulls(self) -> ControllerPatch:
        if not self.model_fields_set:
            raise PydanticCustomError("empty_patch", "name at least one of priority, weight, max_containers, "
                                                     "server_type, url")
        nulls = sorted(f for f in self.model_fields_set - {"max_containers"} if getattr(self, f) is None)
        if nulls:
            raise PydanticCustomError("null_field", "{fields} cannot be null (only max_containers can: it lifts "
                                                    "the cap)", {"fields": ", ".join(nulls)})
        return self


class ControllerOut(BaseModel):
    id: str
    url: str
    server_type: str
    enabled: bool
    priority: int
    weight: int
    status: Literal["healthy", "unhealthy", "unknown", "draining"]
    last_heartbeat_at: datetime | None
    # What the hub places there at most: the controller's own MAX_CONTAINERS, or the admin's cap below
    # it when smaller (``max_containers_cap``, null: none).
    max_containers: int
    max_containers_cap: int | None = None
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
    # A batch job's state change: its job (docs/API.md, Jobs).
    job_id: str | None = None


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


class MeOut(BaseModel):
    """``GET /api/me``: who the token is."""

    username: str
    admin: bool


class UserCreated(BaseModel):
    username: str
    is_admin: bool
    token: str


class ControllerKeyOut(BaseModel):
    """A controller's key as listed: never the key itself, which is shown once, at creation."""

    id: str
    controller_id: str
    prefix: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ControllerKeyCreated(BaseModel):
    id: str
    controller_id: str
    prefix: str
    key: str
    created_at: datetime


class AuditOut(BaseModel):
    """One audit log entry: who did what, when, and how it ended."""

    id: int
    at: datetime
    source: str
    actor: str
    method: str
    path: str
    target: str | None
    status_code: int
    result: Literal["ok", "refused", "error"]
    error_code: str | None
    remote: str | None
    details: dict[str, Any]


class AlertOut(BaseModel):
    """A usage threshold crossed: open while ``resolved_at`` is null (``active``)."""

    id: str
    kind: Literal["cpu", "memory", "disk"]
    controller_id: str
    service_id: str | None
    container_id: str | None
    container_name: str | None
    value: float
    threshold: float
    started_at: datetime
    resolved_at: datetime | None
    active: bool


class MetricPoint(BaseModel):
    """A service's resource use and gateway traffic over one ``resolution``-long bucket starting at ``at``.
    The resource values are null in a bucket with no container sample (``samples`` 0: only traffic)."""

    at: datetime
    samples: int
    cpu_percent_avg: float | None
    cpu_percent_max: float | None
    memory_bytes_avg: int | None
    memory_bytes_max: int | None
    memory_percent_max: float | None
    # The container's counters at the bucket's last sample.
    network_rx_bytes: int | None
    network_tx_bytes: int | None
    block_read_bytes: int | None
    block_write_bytes: int | None
    # Peak VRAM of the service's containers, mean utilisation of their GPUs; null without a GPU.
    gpu_memory_bytes_max: int | None = None
    gpu_util_percent_avg: float | None = None
    # Requests the gateways counted in the bucket, of which 5xx (null in buckets older than this history),
    # and latency quantiles estimated from the histogram's counts in it (null with no request).
    requests: int | None = None
    errors_5xx: int | None = None
    latency_p50_seconds: float | None = None
    latency_p95_seconds: float | None = None
    latency_p99_seconds: float | None = None


class TrafficSummary(BaseModel):
    requests: int
    # Responses by status class ("2xx", "4xx", ...), the gateway's own (429, 503) included.
    responses: dict[str, int]
    errors_5xx: int
    # p50, p95, p99 in seconds, estimated from the histogram's buckets; null with no requests.
    latency_seconds: dict[str, float | None]
    mean_seconds: float | None


class ReplicaTraffic(TrafficSummary):
    # The gateway's server name for the replica; null for answers no replica gave (429, 401, 503).
    replica: str | None


class TrafficOut(TrafficSummary):
    """Requests through the gateways since each started (Prometheus has the rates)."""

    replicas: list[ReplicaTraffic]
    gateways: list[str]
    unreachable_gateways: list[str]


class ServiceMetricsOut(BaseModel):
    service_id: str
    since: datetime
    resolution: int
    points: list[MetricPoint]
    traffic: TrafficOut


class GatewayReport(StrictModel):
    """A gateway's heartbeat: where it answers, and the routing table's version it has applied."""

    url: str = Field(min_length=1, max_length=512, pattern=r"^https?://[^\s]+$")
    metrics_url: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^https?://[^\s]+$")
    version: int = Field(ge=0)
    # Requests routed to each service (by id) since the gateway started.
    traffic: dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=100_000)


class GatewayOut(BaseModel):
    id: str
    url: str
    metrics_url: str | None
    version: int
    created_at: datetime
    last_seen_at: datetime


class ServiceKeyCreate(StrictModel):
    name: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN)


class ServiceKeyOut(BaseModel):
    id: str
    name: str | None
    prefix: str
    created_by: str
    created_at: datetime


class ServiceKeyCreated(ServiceKeyOut):
    # Shown once: the hub keeps only its SHA-256.
    key: str


class ModelTypeIn(StrictModel):
    """A model type as an admin registers it, the shape of each entry of ``modelserver/catalog.json``: the
    service spec fields it fills in (``environment`` is the spec's ``env``), any other spec field under
    ``spec`` (command, volumes, labels, ...); other keys are refused."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    task: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    resources: Resources = Field(default_factory=Resources)
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    probe: ProbeSpec | None = None
    ports: Ports = Field(default_factory=dict)
    health_check: HealthCheckSpec | None = None
    environment: Env = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict, max_length=64)


class ModelTypeOut(BaseModel):
    name: str
    task: str
    description: str
    image: str
    resources: dict[str, Any]
    replicas: int
    probe: dict[str, Any] | None
    ports: dict[str, int | None]
    health_check: dict[str, Any] | None
    environment: dict[str, str]
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime


# The admin image API (docs/API.md, Images): the controllers named, each once.
ControllerIds = Annotated[list[Annotated[str, Field(min_length=1, max_length=128, pattern=NAME_PATTERN)]],
                          Field(min_length=1, max_length=256)]


class ImagePullIn(StrictModel):
    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    controllers: ControllerIds
    # For a registry that needs a login: sent to each controller for this pull only, never stored.
    registry_auth: RegistryAuthIn | None = Field(default=None, exclude=True)


class ImagePruneIn(StrictModel):
    controllers: ControllerIds


class ImageOutcome(BaseModel):
    """What one controller did: ``ok``, with what it pulled or pruned, or the error it answered."""

    controller_id: str
    ok: bool
    image: dict[str, Any] | None = None
    images_deleted: list[str] | None = None
    space_reclaimed: int | None = None
    error: dict[str, Any] | None = None


class ControllerImagesOut(BaseModel):
    """A controller's images; ``ok`` false with the ``error`` it answered (or why it could not be asked),
    as ``GET /api/admin/controllers/{id}/health`` answers for one that is down."""

    controller_id: str
    ok: bool = True
    images: list[dict[str, Any]]
    error: dict[str, Any] | None = None


class ModelFileOut(BaseModel):
    """A file of the model-file store."""

    digest: str
    name: str
    size: int
    uploaded_by: str
    created_at: datetime
