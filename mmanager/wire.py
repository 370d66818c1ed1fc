"""What crosses the wire between the hub and the controllers.

The controller API is the mManager controller API as GeoML-Hub's client calls
it; our hub adds a few fields (``service_id``, ``epoch``, GPU requests, a
health check). Both sides import these models. Messages are read leniently
(``extra="ignore"``: an older or newer peer's extra fields do no harm) and
written strictly (we only ever send fields declared here).

``WIRE_VERSION`` goes up when a field changes meaning; a peer reports it in
``/health`` so a hub can tell what it is talking to.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer

WIRE_VERSION = 1

# Docker label keys (docs/API.md, Controller API). Only the controller writes them.
LABEL_MANAGED = "mmanager.managed"
LABEL_CONTROLLER = "mmanager.controller"
LABEL_SERVICE = "mmanager.service"
LABEL_EPOCH = "mmanager.epoch"
# The service's HTTP health check, as JSON, so a restarted controller still probes it.
LABEL_HEALTH_CHECK = "mmanager.health_check"
# A batch job's container: its job and attempt ids (``mmanager.epoch`` is then the attempt's number). A job's
# container never carries ``mmanager.service``.
LABEL_JOB = "mmanager.job"
LABEL_ATTEMPT = "mmanager.attempt"
LABEL_PREFIX = "mmanager."

ServerType = Literal["gpu", "cpu", "edge"]
HealthState = Literal["healthy", "unhealthy", "unknown"]

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?)([bB]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(value: str | int | float) -> int:
    """Bytes in a memory size: ``2GB``, ``2g``, ``512Mi``, ``1.5G`` or a plain byte count.

    Like Docker, a unit is a power of 1024 whatever its spelling. Raises
    ``ValueError`` for anything else, negative or zero sizes included.
    """
    if isinstance(value, bool):
        raise ValueError("memory size must be a string like '2GB' or a byte count")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = _MEMORY_RE.match(value)
        if not match:
            raise ValueError(f"unparseable memory size {value!r}: use e.g. '512MB', '2GB' or '2g'")
        number, unit, _, _ = match.groups()
        size = int(float(number) * _UNITS[unit.lower()])
    if size <= 0:
        raise ValueError("memory size must be positive")
    return size


def seconds_since(timestamp: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Docker timestamp (``Created``, ``StartedAt``) to now; None when there is none.

    Shared: the controller ages containers for heartbeats and probes, the hub for polled listings.
    """
    if not timestamp or timestamp.startswith("0001-"):
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return ((now or datetime.now(UTC)) - moment).total_seconds()


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# A detail of a container's health that starts with this is a golden-inference probe's wrong answer: final
# until the container starts again (docs/API.md, Golden-inference probes).
PROBE_FAILED = "probe "


def probe_failed(detail: str | None) -> bool:
    """Whether a container's ``health_detail`` says its golden-inference probe got a wrong answer."""
    return detail is not None and detail.startswith(PROBE_FAILED)


def _none(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return not value


class GpuUsage(WireModel):
    """One GPU's latest NVML sample (controller.gpu_monitor). A field NVML cannot read on this GPU is None;
    ``lost``: NVML no longer answers for the GPU (it fell off the bus, or is gone); ``error``: what NVML
    said when a read failed."""

    index: str
    sampled_at: datetime
    lost: bool = False
    error: str | None = Field(default=None, exclude_if=_none)
    utilization_percent: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    temperature_celsius: float | None = Field(default=None, allow_inf_nan=False)
    power_watts: float | None = Field(default=None, ge=0, allow_inf_nan=False)


# The Prometheus gauge of each GpuUsage field, as controllers export them and the hub re-exports them,
# labelled GPU_LABELS (the gpu label is the NVML index). A field that is None has no series.
GPU_METRICS = {
    "utilization_percent": ("mmanager_gpu_utilization_percent", "GPU busy time over the last sample period, percent"),
    "memory_used_bytes": ("mmanager_gpu_memory_used_bytes", "GPU memory in use (VRAM), bytes"),
    "memory_total_bytes": ("mmanager_gpu_memory_total_bytes", "GPU memory (VRAM) in all, bytes"),
    "temperature_celsius": ("mmanager_gpu_temperature_celsius", "GPU core temperature, degrees Celsius"),
    "power_watts": ("mmanager_gpu_power_watts", "GPU power draw, watts"),
    "lost": ("mmanager_gpu_lost", "1 when NVML no longer answers for the GPU"),
}
GPU_LABELS = ("controller", "gpu")


def gpu_values(usage: GpuUsage) -> list[float | None]:
    """The sample's value for each of GPU_METRICS, in its order (None: no series)."""
    return [None if (value := getattr(usage, field)) is None else float(value) for field in GPU_METRICS]


class GoldenProbe(WireModel):
    """A fixed input POSTed to the service once after each start (``path``, ``body``), and the answer it
    must give (``expect``, numbers within ``tolerance``): mmanager.golden."""

    path: str
    body: dict[str, Any] = Field(default_factory=dict)
    expect: Any = None
    tolerance: float = Field(default=1e-4, ge=0)


class HealthCheck(WireModel):
    """An HTTP probe of the service inside its container."""

    path: str = "/health"
    port: int = Field(ge=1, le=65535)
    interval: float = Field(default=5.0, gt=0, le=3600)
    timeout: float = Field(default=3.0, gt=0, le=600)
    # Consecutive failed probes that make a container unhealthy.
    failure_threshold: int = Field(default=3, ge=1, le=100)
    # Seconds after a (re)start during which failures do not count, unless a probe has passed.
    start_period: float = Field(default=30.0, ge=0, le=3600)
    # Sent to the check's port once the check first passes after a start; left out when there is none.
    probe: GoldenProbe | None = Field(default=None, exclude_if=_none)


class RegistryAuth(WireModel):
    """Credentials for the registry of a create's image: used for the pull a missing image needs, never
    stored or logged by the controller. The password shows as ``**********`` in a repr; only the JSON that
    crosses the wire carries it."""

    username: str = Field(min_length=1, max_length=255)
    password: SecretStr = Field(min_length=1, max_length=4096)

    @field_serializer("password", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        return value.get_secret_value()

    def docker_auth(self) -> dict[str, str]:
        """As Docker's ``auth_config`` takes it."""
        return {"username": self.username, "password": self.password.get_secret_value()}


ModelDigest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class ModelFile(WireModel):
    """A file of the hub's model-file store that a container mounts read-only (``controller.model_cache``
    fetches it from the hub by digest, ``sha256:<hex>``), and where the container sees it."""

    digest: ModelDigest
    mount: str


class ModelSync(WireModel):
    """``POST /models/sync`` on a controller: fetch the files of these digests into its cache now."""

    digests: list[ModelDigest] = Field(max_length=256)


class ModelsSynced(WireModel):
    """What a sync did: the digests it fetched from the hub (the others were cached), the bytes and seconds."""

    fetched: list[str] = Field(default_factory=list)
    cached: list[str] = Field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


class ContainerCreate(WireModel):
    """The create body: GeoML-Hub's container config plus what our hub adds."""

    name: str | None = None
    image: str
    command: str | list[str] | None = None
    working_dir: str | None = None
    environment: dict[str, str] | list[str] | None = None
    # {"7860/tcp": 7860}; a null host port lets Docker pick one.
    ports: dict[str, int | None] | None = None
    # {"volume-name": "/path"} or {"volume-name": {"bind": "/path", "mode": "rw"}}
    volumes: dict[str, Any] | None = None
    memory_limit: str | int | None = None
    cpu_limit: float | None = None
    restart_policy: str | dict[str, Any] | None = None
    network_mode: str | None = None
    networks: list[str] | None = None
    labels: dict[str, str] | None = None
    auto_remove: bool = False
    detach: bool = True
    # Added by our hub.
    service_id: str | None = None
    epoch: int | None = Field(default=None, ge=0)
    gpu_count: int = Field(default=0, ge=0)
    gpu_device_ids: list[str] | None = None
    # A VRAM budget (bytes) on one shared GPU (``gpu_device_ids``) instead of whole GPUs.
    gpu_memory: int | None = Field(default=None, ge=1)
    health_check: HealthCheck | None = None
    # Capabilities to add; only mmanager.policy.ALLOWED_CAPABILITIES are accepted.
    cap_add: list[str] | None = None
    # For the pull of a missing image, from a registry that needs a login.
    registry_auth: RegistryAuth | None = Field(default=None, exclude_if=_none)
    # Model files to sync into this controller's cache and bind read-only before the container starts.
    models: list[ModelFile] = Field(default_factory=list, max_length=32, exclude_if=_empty)


class ImagePulled(WireModel):
    """A pull a controller made for a create that found the image missing: shown in the hub's operation."""

    image: str
    layers: int = 0  # layers fetched ("Pull complete"); those already on the host are not counted
    bytes: int = 0  # the image's size once pulled
    seconds: float = 0.0


class ImagePullProgress(WireModel):
    """A pull in progress on a controller (``GET /images/pulls``), from Docker's own progress events: the
    layers it fetches (``layers_total`` counts each one Docker named, those it already had included, done
    or not) and the bytes downloaded of those whose size Docker has said."""

    image: str
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    seconds: float = 0.0


class ContainerCreated(WireModel):
    success: bool = True
    container_id: str
    name: str
    status: str
    ports: dict[str, int | None] = Field(default_factory=dict)
    service_id: str | None = None
    epoch: int | None = None
    # False when an identical (service_id, epoch) create had already run.
    created: bool = True
    gpu_device_ids: list[str] = Field(default_factory=list)
    # Set when this create pulled the image first.
    image_pull: ImagePulled | None = None


class ContainerInfo(WireModel):
    id: str
    container_id: str
    name: str
    image: str
    status: str
    state: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    ports: dict[str, int | None] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    service_id: str | None = None
    epoch: int | None = None
    memory_limit: int | None = None
    cpu_limit: float | None = None
    gpu_device_ids: list[str] = Field(default_factory=list)
    # GeoML-Hub reads this as a dict or null.
    resource_usage: dict[str, Any] | None = None
    # What the controller's HTTP probe says: healthy | unhealthy | unknown (no check, or none passed yet).
    health: HealthState = "unknown"
    # Times the controller restarted it in place because it stayed unhealthy.
    health_restarts: int = 0
    # Why it is unhealthy (the last failed probe, or a golden probe's wrong answer); left out when none.
    health_detail: str | None = Field(default=None, exclude_if=_none)
    # A batch job's container: its job and attempt (``epoch`` is the attempt's number); left out otherwise.
    job_id: str | None = Field(default=None, exclude_if=_none)
    attempt_id: str | None = Field(default=None, exclude_if=_none)


class ContainerList(WireModel):
    containers: list[ContainerInfo]


class GpuInfo(WireModel):
    index: str
    model: str
    memory_mb: int = 0
    # Held by a live managed container (as /health reports it).
    in_use: bool = False


class HealthContainers(WireModel):
    running: int
    max_allowed: int
    managed: int = 0


class HealthResources(WireModel):
    cpu_cores: float
    memory_total_gb: float
    memory_available_gb: float


class HealthCapabilities(WireModel):
    gpu_support: bool
    max_memory_gb: float
    gpus: list[GpuInfo] = Field(default_factory=list)
    # It runs a health check's golden-inference probe (``HealthCheck.probe``). False from a controller that
    # does not say so: an older one ignores the probe and would call a copy that computes garbage healthy.
    golden_probes: bool = False


class ControllerHealth(WireModel):
    status: Literal["healthy", "unhealthy"]
    server_id: str
    server_type: str
    version: str
    wire_version: int = WIRE_VERSION
    docker: bool
    containers: HealthContainers
    resources: HealthResources
    load_percentage: float
    memory_usage_percent: float
    capabilities: HealthCapabilities
    error: str | None = None
    # Each GPU's latest NVML sample; sent only by a controller that has GPUs NVML can read.
    gpu_usage: list[GpuUsage] = Field(default_factory=list, exclude_if=_empty)
    # Of the file system holding Docker's data root (else "/"), as df counts it; None: not measured.
    disk_usage_percent: float | None = Field(default=None, ge=0, le=100)


class ActionResult(WireModel):
    """The answer to start, stop, restart and delete (GeoML-Hub checks ``success``)."""

    success: bool = True
    container_id: str
    status: str
    message: str = ""


class ErrorBody(WireModel):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(WireModel):
    """Every error either side answers: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


# -- heartbeats: controller -> hub (POST /api/controllers/{id}/heartbeat) --------

# Seconds a controller waits for a hub's answer to a heartbeat: half the grace, within these bounds.
MIN_ANSWER_WAIT, MAX_ANSWER_WAIT = 1.0, 5.0


def answer_wait(grace: float) -> float:
    """How long a controller waits for a hub to answer a heartbeat, with ``grace`` the hub's last answer."""
    return min(max(grace / 2, MIN_ANSWER_WAIT), MAX_ANSWER_WAIT)


def retry_after_seconds(status: int, value: str | None, most: float) -> float | None:
    """The seconds a hub's 503 or 429 asked for in its Retry-After (``value``), at most ``most``; None for
    another status, or a value that is not seconds (a date counts as none: a hub sends seconds)."""
    if status not in (429, 503) or value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(seconds, most) if seconds >= 0 and math.isfinite(seconds) else None


# Seconds before a heartbeat that failed is tried again, the first time (doubled for each failure in a row).
FIRST_RETRY = 0.25


def beat_pause(due: float, interval: float, failures: int, *, answered: bool, retry_after: float | None = None,
               rand: Callable[[], float] = random.random) -> float:
    """Seconds until a controller's next heartbeat. ``due``: seconds until its cadence's next beat (negative
    when the last one ran late); ``failures``: how many beats in a row failed, the last one included;
    ``answered``: whether a hub has ever answered this controller; ``retry_after``: the Retry-After of the
    hub's refusal (a 503 while it sheds beats).

    A beat answered keeps the cadence: the next goes on time, at once when late. One that failed is tried
    again after a backoff, ``FIRST_RETRY`` doubled per failure in a row up to the interval, and jittered to
    between half and all of that: a fleet whose beats all went unanswered together (a hub overwhelmed by the
    first beats of thousands of controllers, before any was told the paced interval) does not send them all
    again at once, and a hub behind its beats catches up instead of answering beats no one waits for any
    more. A controller never answered tries again at that pace rather than its interval (it takes no work
    until it is answered); one that was answered goes no sooner than its cadence, and so no more often than
    the hub asked. A hub that answered Retry-After is given that long, plus up to a fifth more.
    """
    if not failures:
        return max(0.0, due)
    backoff = min(FIRST_RETRY * 2 ** min(failures - 1, 30), interval) * (1 + rand()) / 2
    pause = max(due, backoff) if answered else backoff
    if retry_after is not None:
        pause = max(pause, retry_after * (1 + rand() / 5))
    return pause


class ContainerUsage(WireModel):
    """The latest Docker stats sample of a running container (controller.stats), as ``docker stats``
    computes it. ``sampled_at`` (the controller's clock) tells a new sample from one repeated by the
    next heartbeat; network and block I/O are counters since the container started. On a host whose GPUs
    NVML reads, a container given GPUs also carries its VRAM (its processes' summed, as NVML reports them;
    None where they cannot be mapped to containers) and the mean utilisation of its GPUs (NVML has no
    per-process utilisation: a GPU shared by several containers shows its whole use in each); both are
    left out elsewhere."""

    sampled_at: datetime
    cpu_percent: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    memory_bytes: int = Field(default=0, ge=0)
    memory_percent: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    network_rx_bytes: int = Field(default=0, ge=0)
    network_tx_bytes: int = Field(default=0, ge=0)
    block_read_bytes: int = Field(default=0, ge=0)
    block_write_bytes: int = Field(default=0, ge=0)
    gpu_memory_bytes: int | None = Field(default=None, ge=0, exclude_if=_none)
    gpu_util_percent: float | None = Field(default=None, ge=0, allow_inf_nan=False, exclude_if=_none)


# The Prometheus gauge of each ContainerUsage field, as controllers export them and the hub re-exports
# them, labelled USAGE_LABELS (the container label is its name; service is empty for containers without one).
USAGE_METRICS = {
    "cpu_percent": ("mmanager_container_cpu_percent", "CPU use, percent of one core (docker stats)"),
    "memory_bytes": ("mmanager_container_memory_bytes", "Memory in use, page cache excluded"),
    "memory_percent": ("mmanager_container_memory_percent", "Memory in use, percent of the container's limit"),
    "network_rx_bytes": ("mmanager_container_network_rx_bytes", "Bytes received on every network"),
    "network_tx_bytes": ("mmanager_container_network_tx_bytes", "Bytes sent on every network"),
    "block_read_bytes": ("mmanager_container_block_read_bytes", "Bytes read from block devices"),
    "block_write_bytes": ("mmanager_container_block_write_bytes", "Bytes written to block devices"),
}
USAGE_LABELS = ("controller", "service", "container")


class HeartbeatContainer(WireModel):
    """One managed container as the controller sees it right now."""

    container_id: str
    name: str
    service_id: str | None = None
    epoch: int | None = None
    # Docker's state: created | running | restarting | paused | exited | dead
    state: str
    health: HealthState = "unknown"
    health_restarts: int = 0
    # As ContainerInfo's: sent only when there is one.
    health_detail: str | None = Field(default=None, exclude_if=_none)
    # Seconds since Docker created it, by the controller's clock (no clock skew to worry about).
    age_seconds: float = 0.0
    ports: dict[str, int | None] = Field(default_factory=dict)
    # The latest stats sample while it runs; None before the first one (or from an older controller).
    usage: ContainerUsage | None = None
    # A batch job's container (``ContainerInfo``'s): the hub fences one whose attempt is no longer current.
    job_id: str | None = Field(default=None, exclude_if=_none)
    attempt_id: str | None = Field(default=None, exclude_if=_none)


class AuditEvent(WireModel):
    """One call a controller took or refused, shipped to the hub's audit log with a heartbeat."""

    at: datetime
    actor: str
    method: str
    path: str
    target: str | None = None
    status_code: int
    error_code: str | None = None
    remote: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


# The most images one heartbeat lists (the controller caps its list, largest first, and marks it partial).
MAX_HELD_IMAGES = 10000


class HeldImage(WireModel):
    """One image on the controller's Docker host, as its heartbeats report it: every name it answers to
    (``tags``: repository:tag; ``digests``: repository@sha256 from a registry) and its ``id``."""

    id: str
    tags: list[str] = Field(default_factory=list)
    digests: list[str] = Field(default_factory=list)
    size: int = Field(default=0, ge=0)


class Heartbeat(WireModel):
    server_id: str
    # CONTROLLER_URL: where the hub reaches this controller.
    url: str | None = None
    server_type: ServerType = "cpu"
    # Counts up from 1 for each heartbeat this controller process sends.
    sequence: int = 0
    health: ControllerHealth
    containers: list[HeartbeatContainer] = Field(default_factory=list)
    # Seconds between taking the container listing and sending this heartbeat.
    listing_age: float = Field(default=0.0, ge=0)
    # What the controller audited since its last acknowledged heartbeat (bounded, oldest dropped).
    audit: list[AuditEvent] = Field(default_factory=list, max_length=1000)
    # A digest of the images the host holds (None: not reported); ``images`` lists them only when the hub's last
    # answer did not name this version, so an unchanged set costs the beat one short string.
    images_version: str | None = Field(default=None, exclude_if=_none)
    images: list[HeldImage] | None = Field(default=None, exclude_if=_none, max_length=MAX_HELD_IMAGES)
    # ``images`` left some out (the controller's caps): the hub takes the list as what the host holds.
    images_partial: bool = Field(default=False, exclude_if=_empty)


class StopOrder(WireModel):
    """A container the controller must stop and remove before it takes new work."""

    container_id: str
    service_id: str | None = None
    epoch: int | None = None
    # stale_epoch: a newer copy runs elsewhere; orphan: no registry row (the service is gone
    # or a create was lost half-way); stale_attempt: a job's attempt that is no longer its current one.
    reason: str
    attempt_id: str | None = Field(default=None, exclude_if=_none)


class HeartbeatAnswer(WireModel):
    interval: float
    grace: float
    stop: list[StopOrder] = Field(default_factory=list)
    # The image set version (``Heartbeat.images_version``) this hub holds for the controller; another one (or
    # None) asks for the full list with the next beat.
    images_version: str | None = Field(default=None, exclude_if=_none)


# -- batch jobs (docs/API.md, Jobs; controller.jobs runs them, hub.services.jobs dispatches and collects) ----

JobRunState = Literal["pulling", "starting", "running", "exited", "failed", "timed_out", "cancelled"]
# The states in which a run's container no longer runs: its outputs and logs wait for the hub to collect them.
JOB_RUN_ENDED: frozenset[str] = frozenset({"exited", "failed", "timed_out", "cancelled"})


class JobInput(WireModel):
    """A file of the hub's stores (an artifact or a model file, by digest) mounted read-only at
    ``/inputs/{path}``; ``path`` is relative, without ``..``."""

    digest: ModelDigest
    path: str = Field(min_length=1, max_length=255)


class JobRun(WireModel):
    """``POST /jobs/`` on a controller: run one attempt of a job. Idempotent on ``attempt_id``; refused (409
    STALE_EPOCH) when the controller has seen a newer ``number`` for ``job_id``."""

    job_id: str = Field(min_length=1, max_length=64)
    attempt_id: str = Field(min_length=1, max_length=64)
    number: int = Field(ge=1)
    name: str = Field(min_length=1, max_length=128)
    image: str = Field(min_length=1, max_length=512)
    command: list[str] = Field(default_factory=list, max_length=4096)
    environment: dict[str, str] = Field(default_factory=dict)
    inputs: list[JobInput] = Field(default_factory=list, max_length=256)
    memory_limit: str | int | None = None
    cpu_limit: float | None = None
    gpu_count: int = Field(default=0, ge=0)
    gpu_device_ids: list[str] | None = None
    gpu_memory: int | None = Field(default=None, ge=1)
    # Seconds from the container's start after which it is stopped and the run is ``timed_out``.
    timeout: float | None = Field(default=None, gt=0)
    registry_auth: RegistryAuth | None = Field(default=None, exclude_if=_none)


class JobProgress(WireModel):
    """What a job writes to ``$MMANAGER_PROGRESS_FILE`` (JSON, rewritten whole): ``done`` of ``total``
    ``unit``s, and its own ``rate`` (units a second) when it has one."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # JSON has no NaN or Infinity

    done: float = 0
    total: float | None = None
    unit: str = Field(default="items", max_length=32)
    rate: float | None = None
    message: str | None = Field(default=None, max_length=512)


class JobRunInfo(WireModel):
    """One attempt as its controller sees it."""

    attempt_id: str
    job_id: str
    number: int
    state: JobRunState
    container_id: str | None = None
    exit_code: int | None = None
    # Why it failed to start or ended so (an image that cannot be pulled, the timeout, a cancel).
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress | None = None
    # Ended and its outputs listed and checksummed (``GET /jobs/{attempt_id}/outputs``): ready to collect.
    collectable: bool = False
    log_bytes: int = 0
    gpu_device_ids: list[str] = Field(default_factory=list)
    image_pull: ImagePulled | None = None


class JobRunList(WireModel):
    """``GET /jobs/?since=V&wait=S``: every attempt this controller holds, and the version of that list (it
    goes up with each change); with ``wait``, answered once the version passes ``since`` or after S seconds."""

    version: int
    runs: list[JobRunInfo]


class JobOutputFile(WireModel):
    path: str
    size: int
    sha256: str


class JobOutputs(WireModel):
    """``GET /jobs/{attempt_id}/outputs``: what the attempt left under ``/outputs``, each file checksummed."""

    files: list[JobOutputFile]
    log_bytes: int = 0
