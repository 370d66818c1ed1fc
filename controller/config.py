"""The controller's settings, read from the environment under the seed's names.

The names are unprefixed on purpose (``SERVER_ID``, ``MAX_CONTAINERS``…): the
original deployment files use them; the ``MMANAGER_*`` spellings those files
also use are accepted as aliases. Every field can be passed by name as well,
so a hub in dev mode can build one in-process.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from mmanager.keys import key_problem
from mmanager.logs import LogSettings
from mmanager.settings import SpecPolicySettings, TlsSettings
from mmanager.wire import GpuInfo, ServerType, parse_memory


def read_key_file(path: Path, *, dev_mode: bool = False) -> str:
    """The key in ``path`` (surrounding whitespace dropped); ValueError saying why when it is unfit."""
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"MMANAGER_CONTROLLER_KEY_FILE {path} cannot be read: {exc}") from None
    problem = "it is empty" if not key else None if dev_mode else key_problem(key)
    if problem:
        raise ValueError(f"the key in MMANAGER_CONTROLLER_KEY_FILE {path} is unfit: {problem}")
    return key


def parse_gpu_devices(value: str) -> list[GpuInfo]:
    """``0:A100:81920,1:A100:81920`` (index:model:MiB; model and size optional)."""
    gpus = []
    for item in value.split(","):
        if not item.strip():
            continue
        parts = [part.strip() for part in item.split(":")]
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"GPU_DEVICES entry {item!r} is not index:model:MiB")
        model = parts[1] if len(parts) > 1 and parts[1] else "unknown"
        try:
            memory_mb = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        except ValueError:
            raise ValueError(f"GPU_DEVICES entry {item!r}: memory must be MiB as an integer") from None
        gpus.append(GpuInfo(index=parts[0], model=model, memory_mb=memory_mb))
    indexes = [gpu.index for gpu in gpus]
    if len(set(indexes)) != len(indexes):
        raise ValueError("GPU_DEVICES lists a GPU index twice")
    return gpus


class ControllerSettings(SpecPolicySettings, TlsSettings, LogSettings):
    RESOLVE_PATHS = True

    # hide_input_in_errors: a refused setting must not print the keys it was given.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    api_key: SecretStr = Field(validation_alias="MMANAGER_API_KEY")
    # Also accepted from the hub while the hub's key rotates (controller.credentials).
    api_key_next: SecretStr | None = Field(default=None, validation_alias="MMANAGER_API_KEY_NEXT")
    # This controller's own heartbeat key, minted on the hub; the file is re-read when it changes.
    # Neither: heartbeats carry MMANAGER_API_KEY, as the seed's did.
    controller_key: SecretStr | None = Field(default=None, validation_alias="MMANAGER_CONTROLLER_KEY")
    controller_key_file: Path | None = Field(default=None, validation_alias="MMANAGER_CONTROLLER_KEY_FILE")
    # Dev mode (`mmanager dev`): weak keys are let through.
    dev_mode: bool = Field(default=False, validation_alias=AliasChoices("MMANAGER_DEV", "MMANAGER_DEV_MODE"))
    server_id: str = Field(default_factory=socket.gethostname, min_length=1, validation_alias="SERVER_ID")
    server_type: ServerType = Field(default="cpu", validation_alias=AliasChoices("SERVER_TYPE", "MMANAGER_SERVER_TYPE"))
    max_containers: int = Field(
        default=100, ge=1, validation_alias=AliasChoices("MAX_CONTAINERS", "MMANAGER_MAX_CONTAINERS")
    )
    # None: the Docker SDK's own defaults (DOCKER_HOST from the environment, else the local socket).
    docker_host: str | None = Field(default=None, validation_alias="DOCKER_HOST")
    docker_timeout: float = Field(default=60, gt=0, validation_alias="DOCKER_TIMEOUT")
    # Seconds a create waits for the pull of an image this host lacks before answering IMAGE_PULL_FAILED.
    pull_timeout: float = Field(default=600, gt=0, validation_alias="MMANAGER_PULL_TIMEOUT")
    # Where heartbeats go: one hub URL, or several hub replicas' comma-separated. None: the hub polls only.
    hub_url: str | None = Field(default=None, validation_alias="MMANAGER_HUB_URL")
    controller_url: str | None = Field(default=None, validation_alias="CONTROLLER_URL")
    # Hold a presence stream open to the hub beside the heartbeats (controller.presence): the hub then
    # detects this process's death at once instead of after the heartbeat grace.
    presence: bool = Field(default=True, validation_alias="MMANAGER_PRESENCE")
    port: int = Field(default=8001, ge=1, le=65535, validation_alias=AliasChoices("PORT", "MMANAGER_PORT"))
    # None: detect through NVML. A list (even empty) replaces detection.
    gpu_devices: Annotated[list[GpuInfo] | None, NoDecode] = Field(default=None, validation_alias="GPU_DEVICES")
    # Host address published container ports bind to; "" = all interfaces.
    publish_ip: str = Field(default="", validation_alias="PUBLISH_IP")
    # Request bodies larger than this answer 413 PAYLOAD_TOO_LARGE (mmanager.limits); file and
    # directory uploads come base64-encoded in JSON, hence the room.
    max_request_bytes: int = Field(default=64 * 1024**2, ge=1024, validation_alias="MMANAGER_MAX_REQUEST_BYTES")
    # Audit events kept for the hub until a heartbeat delivers them (controller.audit); the oldest go first.
    audit_buffer: int = Field(default=10_000, ge=1, validation_alias="MMANAGER_AUDIT_BUFFER")
    # Every container gets a PID limit, and this memory limit when its spec has none.
    pids_limit: int = Field(default=4096, ge=16, validation_alias="MMANAGER_PIDS_LIMIT")
    default_memory_limit: str = Field(default="2g", validation_alias="MMANAGER_DEFAULT_MEMORY_LIMIT")
    # Followed logs open at once (each holds a Docker connection and a thread of its own pool); more
    # answer 429 TOO_MANY_LOG_STREAMS.
    max_log_streams: int = Field(default=16, ge=1, le=1024, validation_alias="MMANAGER_MAX_LOG_STREAMS")
    # The most a logs call without follow answers: the newest bytes of the tail asked for.
    max_log_bytes: int = Field(default=10 * 1024**2, ge=1024, validation_alias="MMANAGER_MAX_LOG_BYTES")
    # Docker's json-file rotation for every container's stdout and stderr: at most size × files on disk.
    log_max_size: str = Field(default="50m", pattern=r"^[1-9][0-9]*[kmg]?$", validation_alias="MMANAGER_LOG_MAX_SIZE")
    log_max_files: int = Field(default=3, ge=1, le=100, validation_alias="MMANAGER_LOG_MAX_FILES")
    # Seconds between Docker stats samples of the running managed containers (controller.stats); 0: none.
    stats_interval: float = Field(default=10.0, ge=0, validation_alias="MMANAGER_STATS_INTERVAL")
    # Consecutive samples (each MMANAGER_STATS_INTERVAL) a shared-GPU container may use more VRAM than its
    # budget before it is restarted (controller.vram); 0: never.
    gpu_memory_strikes: int = Field(default=2, ge=0, le=100, validation_alias="MMANAGER_GPU_MEMORY_STRIKES")
    # The model-file cache (controller.model_cache): where files fetched from the hub's store are kept, one copy
    # per digest shared read-only by every container here (a path the Docker daemon sees as the same path),
    # and the most bytes it holds before the least recently used file no container mounts is evicted.
    model_cache_dir: Path = Field(default=Path("/var/lib/mmanager/models"), validation_alias="MMANAGER_MODEL_CACHE_DIR")
    model_cache_bytes: int = Field(default=100 * 1024**3, ge=1, validation_alias="MMANAGER_MODEL_CACHE_BYTES")
    # Batch jobs' attempts (controller.jobs): one folder each (the request, outputs/, progress/, the log, the
    # result), kept until the hub has collected them; a path the Docker daemon sees as the same path.
    job_dir: Path = Field(default=Path("/var/lib/mmanager/jobs"), validation_alias="MMANAGER_JOB_DIR")
    # Seconds between listings of the images this host holds, for the heartbeats (controller.inventory); 0: never
    # reported. A pull by this controller lists them again at once.
    images_interval: float = Field(default=10.0, ge=0, validation_alias="MMANAGER_IMAGES_INTERVAL")
    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("MMANAGER_API_KEY must not be empty")
        return value

    @field_validator("api_key_next", "controller_key", "controller_key_file", mode="before")
    @classmethod
    def _blank_key_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _refuse_weak_keys(self) -> ControllerSettings:
        if self.controller_key is not None and self.controller_key_file is not None:
            raise ValueError("set MMANAGER_CONTROLLER_KEY or MMANAGER_CONTROLLER_KEY_FILE, not both")
        if self.controller_key_file is not None:
            read_key_file(self.controller_key_file, dev_mode=self.dev_mode)
        if self.dev_mode:
            return self
        for name, key in (("MMANAGER_API_KEY", self.api_key), ("MMANAGER_API_KEY_NEXT", self.api_key_next),
                          ("MMANAGER_CONTROLLER_KEY", self.controller_key)):
            problem = key_problem(key.get_secret_value()) if key is not None else None
            if problem:
                raise ValueError(
                    f"{name} is unfit: {problem}. Set a random key of 16+ characters (e.g. `openssl rand -hex 32`), "
                    "or MMANAGER_DEV=true on a local playground."
                )
        return self

    @field_validator("gpu_devices", mode="before")
    @classmethod
    def _parse_gpus(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_gpu_devices(value) if value.strip() else None
        return value

    @field_validator("default_memory_limit")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        parse_memory(value)
        return value

    @field_validator("publish_ip")
    @classmethod
    def _ip_or_empty(cls, value: str) -> str:
        value = value.strip()
        if value:
            ipaddress.ip_address(value)
        return value

    @field_validator("docker_host", "hub_url", "controller_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _default_controller_url(self) -> ControllerSettings:
        if self.controller_url is None:
            scheme = "https" if self.tls.serves_https else "http"
            self.controller_url = f"{scheme}://{socket.gethostname()}:{self.port}"
        return self
