"""Hub settings: one pydantic-settings class, injected where it is needed."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hub.schemas import MAX_REPLICAS, reachable_url
from hub.sealing import Sealer, parse_key
from mmanager.keys import key_problem
from mmanager.logs import LogSettings
from mmanager.settings import SpecPolicySettings, TlsSettings
from mmanager.wire import parse_memory


class ControllerEntry(BaseModel):
    """One entry of ``MMANAGER_CONTROLLERS``: the seed's shape, plus an optional key."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A URL the hub's client can call (host and port parse, as the API checks them); unlike the API's, it may
    # carry a path: a controller behind a proxy under a prefix.
    url: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^https?://[^\s]+$"),
                   AfterValidator(reachable_url)]
    server_type: Literal["gpu", "cpu", "edge"] = "cpu"
    enabled: bool = True
    priority: int = Field(default=1, ge=0, le=1000)
    weight: int = Field(default=100, ge=1, le=10000)
    api_key: SecretStr | None = None


def parse_controllers(raw: str) -> list[ControllerEntry]:
    """``MMANAGER_CONTROLLERS``: inline JSON, or a YAML/JSON file's path; ids must be unique. Unset: none."""
    raw = raw.strip()
    if not raw:
        return []
    if raw[0] in "[{":
        data: Any = json.loads(raw)
    else:
        data = yaml.safe_load(Path(raw).read_text())
    # An empty or truncated file, or a mis-keyed mapping, is refused rather than read as "no controllers": a
    # reload would delete or disable every controller the file listed. No controllers at all is `controllers: []`.
    if isinstance(data, dict):
        key = next((k for k in ("controllers", "mmanager_controllers") if k in data), None)
        if key is None:
            raise ValueError("MMANAGER_CONTROLLERS has no 'controllers' list (write `controllers: []` for none)")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError("MMANAGER_CONTROLLERS must be a list of controllers (or a mapping with one under "
                         "'controllers'); it is empty or truncated, or not a list (write `controllers: []` "
                         "for none)")
    entries = [ControllerEntry.model_validate(item) for item in data]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ValueError(f"MMANAGER_CONTROLLERS names controller {entry.id!r} twice")
        seen.add(entry.id)
    return entries


def _unfit(name: str, problem: str) -> str:
    return (f"{name} is unfit for the hub↔controller key: {problem}. "
            "Set a random key of 16+ characters (e.g. `openssl rand -hex 32`), "
            "or run `mmanager dev` for a local playground.")


def _check_entries(entries: list[ControllerEntry]) -> None:
    for entry in entries:
        if entry.api_key is not None and (problem := key_problem(entry.api_key.get_secret_value())):
            raise ValueError(_unfit(f"api_key of controller {entry.id}", problem))


class DatabaseSettings(BaseSettings):
    """Only where the database is: what migrations and user admin need, without the hub's key."""

    # hide_input_in_errors: a refused setting must not print the keys (or database password) it was given.
    model_config = SettingsConfigDict(
        env_prefix="MMANAGER_", env_file=".env", extra="ignore", hide_input_in_errors=True, populate_by_name=True
    )

    database_url: str = "sqlite+aiosqlite:///./mmanager.db"


class HubKeySettings(DatabaseSettings):
    """The hub key and where its sealed values are: what the hub and ``mmanager hub-key rotate`` need."""

    # Seals what the hub stores of users' secrets (a service's registry_auth and secrets): base64 of 32
    # bytes, given itself or in a file (mode 600). Without one, a spec with secrets is refused (HUB_KEY_MISSING).
    hub_key: SecretStr | None = None
    hub_key_file: Path | None = None
    # Keys the hub still opens with but never seals under (a rotation under way, docs/OPERATIONS.md): base64
    # keys separated by commas or whitespace, given themselves or in a file.
    hub_key_previous: SecretStr | None = None
    hub_key_previous_file: Path | None = None

    @field_validator("hub_key", "hub_key_file", "hub_key_previous", "hub_key_previous_file", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_source_each(self) -> HubKeySettings:
        if self.hub_key is not None and self.hub_key_file is not None:
            raise ValueError("set MMANAGER_HUB_KEY or MMANAGER_HUB_KEY_FILE, not both")
        if self.hub_key_previous is not None and self.hub_key_previous_file is not None:
            raise ValueError("set MMANAGER_HUB_KEY_PREVIOUS or MMANAGER_HUB_KEY_PREVIOUS_FILE, not both")
        _ = self.sealer  # an unfit or unreadable hub key stops the hub at its start, not at a create
        return self

    @cached_property
    def sealer(self) -> Sealer | None:
        """What seals the hub's stored secrets (``hub.sealing``): under the hub key, opening with the previous
        keys too; None when no hub key is set (previous keys alone are refused: nothing could seal)."""
        text = _key_text("MMANAGER_HUB_KEY", self.hub_key, self.hub_key_file)
        previous = _key_text("MMANAGER_HUB_KEY_PREVIOUS", self.hub_key_previous, self.hub_key_previous_file)
        if text is None:
            if previous is not None:
                raise ValueError("MMANAGER_HUB_KEY_PREVIOUS is set without MMANAGER_HUB_KEY: set the new key too")
            return None
        keys = [] if previous is None else [k for k in previous.replace(",", "\n").split() if k]
        try:
            olds = [parse_key(k) for k in keys]
        except ValueError as exc:
            raise ValueError(f"MMANAGER_HUB_KEY_PREVIOUS: {exc}") from None
        return Sealer(parse_key(text), olds)


# DatabaseSettings (through HubKeySettings) last: of several bases, the last one's model_config wins (the env
# prefix among it).
class HubSettings(SpecPolicySettings, TlsSettings, LogSettings, HubKeySettings):
    # Inline JSON, or the path of a YAML/JSON file; a file is read again on SIGHUP and when it changes
    # (hub.background.controllers_file), every controllers_watch_interval seconds (0: on SIGHUP only).
    controllers: str = ""
    controllers_watch_interval: float = Field(default=5.0, ge=0, le=3600)
    api_key: SecretStr | None = None
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_grace: float = Field(default=6.0, gt=0)
    # Heartbeats a second the whole fleet may send (0: no limit): a fleet bigger than interval × this is
    # answered a longer interval and grace, stretched alike (hub.services.pace).
    heartbeat_max_rate: float = Field(default=1000.0, ge=0)
    # Heartbeats received and not yet recorded past which new ones are answered 503 with Retry-After at once
    # (the controller tries again at its next beat) instead of queueing past the controllers' timeouts.
    heartbeat_backlog: int = Field(default=5000, ge=1)
    # The hub-wide per-user quotas (hub.services.quotas): service replicas, GPUs and memory (a size, "64G",
    # or bytes) over a user's services, every replica counted; null: no limit. A user's own quotas, set
    # through the API, take their place. The defaults bind non-admins only.
    max_services_per_user: int = Field(default=5, ge=0)
    max_gpus_per_user: int | None = Field(default=None, ge=0)
    max_memory_per_user: int | None = Field(default=None, ge=0)
    # The most replicas one service may ask for (a spec's ``replicas`` above it is refused).
    max_replicas: int = Field(default=64, ge=1, le=MAX_REPLICAS)
    # Seconds a replica trusts its in-memory copy of controller keys and user tokens: a revoke made on
    # another replica, or from the command line, is refused by this one within this time (0: every call
    # asks the database).
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    # Per-user token bucket on authenticated /api/ calls, per hub replica (hub.ratelimit): requests a
    # second (0 = off) and the burst a user may spend at once.
    rate_limit: float = Field(default=50.0, ge=0)
    rate_burst: int = Field(default=200, ge=1)
    # Hosts {service}.{owner}.{service_domain} route to a service at the gateway, besides /s/{owner}/{service}/.
    service_domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
    service_idle_timeout: int = Field(default=30, ge=0)
    # The URL a service's `url` starts with; empty: the advertised URL of a live gateway (hub.services.gateway).
    gateway_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    # How often the leader checks whether the routing table changed (a cheap read when it did not).
    gateway_publish_interval: float = Field(default=0.25, gt=0, le=60)
    # How long a planned move waits for the live gateways to stop routing to the copy it retires.
    gateway_drain_timeout: float = Field(default=30.0, ge=0)
    # How often the leader looks for copies running their CPU fallback that a freed GPU could take back
    # (0: never), and how many such moves it starts per look (docs/API.md, CPU fallback).
    gpu_return_interval: float = Field(default=5.0, ge=0, le=3600)
    gpu_return_batch: int = Field(default=4, ge=1, le=1000)
    # Seconds a gateway holds a request for a running service it has no replica for (a failover under way)
    # before its 503.
    gateway_replace_hold: float = Field(default=5.0, ge=0, le=300)
    # Seconds the hub waits on a controller for one call; creating a container
    # can include an image pull-free create and start, so it gets more.
    controller_timeout: float = Field(default=30.0, gt=0)
    controller_create_timeout: float = Field(default=120.0, gt=0)
    # An admin pull (POST /api/admin/images/pull) waits for the whole pull: longer than a controller's own
    # limit on one (MMANAGER_PULL_TIMEOUT, 600 s by default), so the controller's answer comes first.
    controller_pull_timeout: float = Field(default=630.0, gt=0)
    # Failure handling. A container of ours that the registry does not know is removed once it is
    # older than orphan_grace (0: twice the heartbeat grace, at least 10 s).
    orphan_grace: float = Field(default=0.0, ge=0)
    # How long a planned move waits for the new copy's health check before giving up.
    health_timeout: float = Field(default=300.0, gt=0)
    # How long POST .../drain waits before answering 202 with the operation still running.
    drain_timeout: float = Field(default=300.0, gt=0)
    # In-place restarts (by the controller) of an unhealthy container before it is moved elsewhere.
    max_health_restarts: int = Field(default=3, ge=1)
    # Moves the reconciler runs at once (failover of many services in parallel).
    reconcile_concurrency: int = Field(default=32, ge=1)
    # Request bodies larger than this answer 413 PAYLOAD_TOO_LARGE (mmanager.limits). Heartbeats get
    # their own, larger limit: they list every container a controller runs (~300 bytes each) and up
    # to 1000 audit events (~0.5 KB each), so a big controller's beat outgrows 1 MiB.
    max_request_bytes: int = Field(default=1024**2, ge=1024)
    max_heartbeat_bytes: int = Field(default=8 * 1024**2, ge=1024)
    # The model-file store (hub.services.model_files): its directory (shared by every hub replica), and the
    # largest file an upload may bring; a bigger one answers 413 PAYLOAD_TOO_LARGE. The store holds at most
    # model_store_max_bytes (507 MODEL_STORE_FULL past it), each user's uploads model_files_per_user_bytes
    # (409 MODEL_FILE_QUOTA_EXCEEDED); each replica takes model_uploads at once (429 TOO_MANY_UPLOADS).
    # Temporary files older than model_upload_grace seconds are a dead replica's and go at start.
    model_store: Path = Path("./model-store")
    model_file_max_bytes: int = Field(default=20 * 1024**3, ge=1)
    model_store_max_bytes: int = Field(default=500 * 1024**3, ge=1)
    model_files_per_user_bytes: int = Field(default=100 * 1024**3, ge=1)
    model_uploads: int = Field(default=4, ge=1)
    model_upload_grace: float = Field(default=24 * 3600.0, gt=0)
    # Batch jobs (hub.services.jobs): the artifact store's directory (shared by every hub replica, as the
    # model store), the largest upload (413 PAYLOAD_TOO_LARGE), each user's uploads and outputs together
    # (507 ARTIFACT_QUOTA_EXCEEDED for an upload past it), and the jobs a user may have pending or running
    # (429 JOB_QUOTA_EXCEEDED). The queue is polled every job_poll_interval seconds (a submit or an attempt's
    # end on this replica wakes it at once); the leader long-polls each controller for job_watch_wait seconds.
    artifact_store: Path = Path("./artifact-store")
    artifact_max_bytes: int = Field(default=5 * 1024**3, ge=1)
    artifacts_per_user_bytes: int = Field(default=50 * 1024**3, ge=1)
    max_jobs_per_user: int = Field(default=100, ge=0)
    job_poll_interval: float = Field(default=0.5, gt=0, le=60)
    job_watch_wait: float = Field(default=10.0, gt=0, le=120)
    # A controller's sync of a create's model files before the create (POST /models/sync): a large file
    # takes as long as it takes, and the create's own timeout then covers only the container.
    model_sync_timeout: float = Field(default=1800.0, gt=0)
    # Followed logs (GET /api/services/{id}/logs?follow=true) open at once on this replica, per user and
    # in all; more answer 429 TOO_MANY_LOG_STREAMS. Each holds a connection to a controller, from a
    # pool of their own. A logs call without follow answers at most max_log_bytes, the newest.
    max_log_streams: int = Field(default=64, ge=1, le=10_000)
    max_log_streams_per_user: int = Field(default=4, ge=1)
    max_log_bytes: int = Field(default=10 * 1024**2, ge=1024)
    # Container monitoring (hub.services.monitoring): usage at or over a threshold opens an alert, a
    # little under it resolves it. History: one row per service per metrics_resolution seconds, kept
    # metrics_retention seconds (resolved alerts too).
    alert_cpu_percent: float = Field(default=80.0, gt=0)
    alert_memory_percent: float = Field(default=90.0, gt=0, le=100)
    alert_disk_percent: float = Field(default=85.0, gt=0, le=100)
    metrics_resolution: float = Field(default=60.0, ge=1, le=3600)
    metrics_retention: float = Field(default=7 * 86400.0, ge=60)
    # Those alerts pushed to Alertmanager by the leader (hub.background.alertmanager): its base URL, or a
    # comma-separated list of one cluster's members (each gets every alert); empty: not pushed. Open alerts are
    # re-sent every alertmanager_interval seconds, resolved ones for a while after they resolve.
    alertmanager_url: str = Field(default="", pattern=r"^\s*(https?://[^\s,]+\s*(,\s*https?://[^\s,]+\s*)*)?$")
    alertmanager_interval: float = Field(default=30.0, ge=0.1, le=300)
    # Where Prometheus reaches this hub: a base URL, or a comma-separated list of every replica's.
    # GET /api/admin/prometheus/targets lists them; empty: the URL that call came to.
    public_url: str = Field(default="", pattern=r"^\s*(https?://[^\s,]+\s*(,\s*https?://[^\s,]+\s*)*)?$")
    # The web console (hub.ui): the hub's URL as browsers reach it (behind a TLS-terminating proxy, its https
    # address; empty: each request's own scheme and host). A form's Origin must name it, and its scheme makes
    # the session cookie Secure and __Host- prefixed. Not public_url: that one lists every replica's address.
    console_url: str = Field(default="", pattern=r"^\s*(https?://[^\s,/]+(/[^\s,]*)?)?\s*$")
    # The console's session cookie's lifetime (its Max-Age).
    console_session_seconds: int = Field(default=12 * 3600, ge=60, le=90 * 86400)
    # A token that reaches only GET /api/admin/prometheus/targets (besides admin tokens), for Prometheus.
    prometheus_token: SecretStr | None = None
    dev_mode: bool = False
    # Pre-pull onto likely failover targets (hub.background.prefetch): seconds between the leader's passes (0: off),
    # the image size from which every service's image is pre-pulled (0: only services with ``prefetch``), and
    # how many targets each service gets.
    prefetch_interval: float = Field(default=30.0, ge=0)
    prefetch_min_image_bytes: int = Field(default=2 * 1024**3, ge=0)
    prefetch_targets: int = Field(default=1, ge=1, le=16)

    @field_validator("prometheus_token", "gateway_url", "service_domain", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # MMANAGER_PROMETHEUS_TOKEN= (as a compose file may pass it) means no such token.
        return None if value == "" else value

    @field_validator("max_gpus_per_user", "max_memory_per_user", mode="before")
    @classmethod
    def _quota(cls, value: Any, info: Any) -> Any:
        if value is None or value == "":
            return None
        if info.field_name == "max_memory_per_user" and isinstance(value, str) and not value.strip().isdigit():
            return parse_memory(value)
        return value

    @model_validator(mode="after")
    def _refuse_weak_keys(self) -> HubSettings:
        if self.dev_mode:
            return self
        problem = key_problem(self.api_key.get_secret_value() if self.api_key else None)
        if problem:
            raise ValueError(_unfit("MMANAGER_API_KEY", problem))
        _check_entries(self.controller_entries)
        if self.prometheus_token is not None and (problem := key_problem(self.prometheus_token.get_secret_value())):
            raise ValueError(f"MMANAGER_PROMETHEUS_TOKEN is unfit: {problem}. Set a random token of 16+ characters.")
        return self

    @cached_property
    def controller_entries(self) -> list[ControllerEntry]:
        """The entries in force: those read at the start, then those of the last good reload."""
        return parse_controllers(self.controllers)

    @property
    def controllers_file(self) -> Path | None:
        """The file MMANAGER_CONTROLLERS names, if it names one rather than holding the JSON itself."""
        raw = self.controllers.strip()
        return Path(raw) if raw and raw[0] not in "[{" else None

    def read_controller_entries(self) -> list[ControllerEntry]:
        """MMANAGER_CONTROLLERS read again, checked as at the start (ValueError or OSError: unfit)."""
        entries = parse_controllers(self.controllers)
        if not self.dev_mode:
            _check_entries(entries)
        return entries

    def use_controller_entries(self, entries: list[ControllerEntry]) -> None:
        """Put ``entries`` in force: the keys ``key_for`` presents come from them from now on."""
        self.__dict__["controller_entries"] = list(entries)

    @property
    def public_urls(self) -> list[str]:
        return [url.strip() for url in self.public_url.split(",") if url.strip()]

    @property
    def alertmanager_urls(self) -> list[str]:
        return [url.strip().rstrip("/") for url in self.alertmanager_url.split(",") if url.strip()]

    def key_for(self, controller_id: str) -> str:
        """The key the hub presents to a controller: its own from the config, else the shared one."""
        for entry in self.controller_entries:
            if entry.id == controller_id and entry.api_key is not None:
                return entry.api_key.get_secret_value()
        return self.api_key.get_secret_value() if self.api_key else ""


def _key_text(name: str, value: SecretStr | None, path: Path | None) -> str | None:
    """A hub key setting's text: given itself (``name``) or in a file (``name``_FILE); None when unset."""
    if path is not None:
        try:
            return path.read_text()
        except OSError as exc:
            raise ValueError(f"{name}_FILE {path} cannot be read: {exc.strerror}") from None
    return value.get_secret_value() if value is not None else None
