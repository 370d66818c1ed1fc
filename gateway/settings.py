"""The gateway agent's settings: the hub to follow (``MMANAGER_HUB_URL``, ``MMANAGER_API_KEY``) and its
own (``MMANAGER_GATEWAY_*``); the ``mmanager gateway serve`` options override them.

Invariant: a built ``GatewaySettings`` is complete: the metrics port and URL, the advertised URL and the
gateway's id are filled in from the listening address when not given.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.config import RenderSettings
from mmanager.logs import LogSettings


class GatewaySettings(LogSettings):
    # hide_input_in_errors: a refused setting must not print the key it was given.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    # One hub URL, or several hub replicas' comma-separated (the next is tried when one does not answer).
    hub_url: str = Field(validation_alias="MMANAGER_HUB_URL")
    api_key: SecretStr = Field(validation_alias="MMANAGER_API_KEY")
    host: str = Field(default="0.0.0.0", validation_alias="MMANAGER_GATEWAY_HOST")
    port: int = Field(default=8080, ge=1, le=65535, validation_alias="MMANAGER_GATEWAY_PORT")
    # None: port + 1. HAProxy's Prometheus exporter (/metrics) and /healthz.
    metrics_port: int | None = Field(default=None, ge=1, le=65535, validation_alias="MMANAGER_GATEWAY_METRICS_PORT")
    # None: http://{host}:{port}, with 0.0.0.0 (or ::) replaced by this machine's name.
    advertise_url: str | None = Field(default=None, validation_alias="MMANAGER_GATEWAY_ADVERTISE_URL")
    # Where the metrics frontend answers (its base URL: HAProxy's exporter is at /metrics under it, the latency
    # histograms at /metrics/latency). None: the advertised URL's host and the metrics port. Handed to the hub,
    # which lists both for Prometheus and reads the histograms for GET /api/services/{id}/metrics.
    metrics_url: str | None = Field(default=None, validation_alias="MMANAGER_GATEWAY_METRICS_URL")
    # None: {hostname}-{port}.
    id: str | None = Field(default=None, validation_alias="MMANAGER_GATEWAY_ID")
    # haproxy.cfg, its map files, its sockets and the last routing table applied.
    state_dir: Path = Field(default=Path("/var/lib/mmanager/gateway"), validation_alias="MMANAGER_GATEWAY_STATE_DIR")
    # Seconds between polls of the hub's routing table.
    poll: float = Field(default=0.5, gt=0, le=60, validation_alias="MMANAGER_GATEWAY_POLL")
    # Seconds between registrations with the hub when nothing changes (one follows every apply as well).
    heartbeat: float = Field(default=5.0, gt=0, le=60, validation_alias="MMANAGER_GATEWAY_HEARTBEAT")
    # Seconds a request to an idle service is held while the hub starts it (gateway/wake.lua).
    wake_hold: float = Field(default=60.0, ge=0, le=600, validation_alias="MMANAGER_GATEWAY_WAKE_HOLD")
    haproxy: str = Field(default="haproxy", validation_alias="MMANAGER_GATEWAY_HAPROXY")

    @field_validator("hub_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        urls = [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
        if not urls or not all(url.startswith(("http://", "https://")) for url in urls):
            raise ValueError("MMANAGER_HUB_URL must be an http(s) URL, or several comma-separated")
        return ",".join(urls)

    @property
    def hub_urls(self) -> list[str]:
        return self.hub_url.split(",")

    @field_validator("state_dir")
    @classmethod
    def _no_spaces(cls, value: Path) -> Path:
        # The map files' paths are written into haproxy.cfg unquoted.
        if any(ch.isspace() or ch in "\"'#," for ch in str(value)):
            raise ValueError("MMANAGER_GATEWAY_STATE_DIR must have no spaces, quotes, '#' or ','")
        return value.absolute()

    @field_validator("metrics_port", "advertise_url", "metrics_url", "id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _fill_in(self) -> GatewaySettings:
        if self.metrics_port is None:
            self.metrics_port = self.port + 1 if self.port < 65535 else self.port - 1
        if self.metrics_port == self.port:
            raise ValueError("the metrics port must differ from the gateway's port")
        if self.advertise_url is None:
            host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
            self.advertise_url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        if self.metrics_url is None:
            host = urlsplit(self.advertise_url).hostname or socket.gethostname()
            self.metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{self.metrics_port}"
        if self.id is None:
            self.id = f"{socket.gethostname()}-{self.port}"
        return self

    @property
    def render_settings(self) -> RenderSettings:
        assert self.metrics_port is not None
        return RenderSettings(self.host, self.port, self.metrics_port, self.state_dir)
