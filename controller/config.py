"""The controller's settings, read from the environment under the seed's names.

The names are unprefixed on purpose (``SERVER_ID``, ``MAX_CONTAINERS``…): the
original deployment files use them; the ``MMANAGER_*`` spellings those files
also use are accepted as aliases. Every field can be passed by name as well,
so a hub in dev mode can build one in-process.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mmanager.wire import GpuInfo, ServerType


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


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    api_key: SecretStr = Field(validation_alias="MMANAGER_API_KEY")
    server_id: str = Field(default_factory=socket.gethostname, min_length=1, validation_alias="SERVER_ID")
    server_type: ServerType = Field(default="cpu", validation_alias=AliasChoices("SERVER_TYPE", "MMANAGER_SERVER_TYPE"))
    max_containers: int = Field(
        default=100, ge=1, validation_alias=AliasChoices("MAX_CONTAINERS", "MMANAGER_MAX_CONTAINERS")
    )
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("LOG_LEVEL", "MMANAGER_LOG_LEVEL"))
    log_file: Path | None = Field(default=None, validation_alias="LOG_FILE")
    # None: the Docker SDK's own defaults (DOCKER_HOST from the environment, else the local socket).
    docker_host: str | None = Field(default=None, validation_alias="DOCKER_HOST")
    docker_timeout: float = Field(default=60, gt=0, validation_alias="DOCKER_TIMEOUT")
    # Where heartbeats go: one hub URL, or several hub replicas' comma-separated. None: the hub polls only.
    hub_url: str | None = Field(default=None, validation_alias="MMANAGER_HUB_URL")
    controller_url: str | None = Field(default=None, validation_alias="CONTROLLER_URL")
    port: int = Field(default=8001, ge=1, le=65535, validation_alias=AliasChoices("PORT", "MMANAGER_PORT"))
    # None: detect through NVML. A list (even empty) replaces detection.
    gpu_devices: Annotated[list[GpuInfo] | None, NoDecode] = Field(default=None, validation_alias="GPU_DEVICES")
    # Host address published container ports bind to; "" = all interfaces.
    publish_ip: str = Field(default="", validation_alias="PUBLISH_IP")

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("MMANAGER_API_KEY must not be empty")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("gpu_devices", mode="before")
    @classmethod
    def _parse_gpus(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_gpu_devices(value) if value.strip() else None
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
            self.controller_url = f"http://{socket.gethostname()}:{self.port}"
        return self
