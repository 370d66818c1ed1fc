"""Turn a create request into a checked container specification.

Pure: no Docker here. Everything a caller can get wrong is refused with a 422
before the daemon is asked for anything, so a bad request never leaves a
half-made container behind.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from controller.errors import ForbiddenLabel, ForbiddenVolume, InvalidRequest
from mmanager.wire import (
    LABEL_CONTROLLER,
    LABEL_EPOCH,
    LABEL_HEALTH_CHECK,
    LABEL_MANAGED,
    LABEL_PREFIX,
    LABEL_SERVICE,
    ContainerCreate,
    parse_memory,
)

_PORT_RE = re.compile(r"^(\d{1,5})(?:/(tcp|udp|sctp))?$")
# Docker's own rule for volume names; anything else (a path) would be a bind mount.
_VOLUME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_RESTART_NAMES = {"no", "always", "unless-stopped", "on-failure"}
# Far above any host, low enough that Docker's 64-bit fields hold them.
_MAX_CPUS = 4096
_MAX_MEMORY = 2**60


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    labels: dict[str, str]
    name: str | None = None
    command: str | list[str] | None = None
    working_dir: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # "5000/tcp" -> host port; None lets Docker pick one.
    ports: dict[str, int | None] = field(default_factory=dict)
    publish_ip: str = ""
    # volume name -> {"bind": path, "mode": "rw"|"ro"}
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    mem_limit: int | None = None
    nano_cpus: int | None = None
    restart_policy: dict[str, Any] | None = None
    network_mode: str | None = None
    networks: list[str] = field(default_factory=list)
    auto_remove: bool = False
    gpu_device_ids: list[str] = field(default_factory=list)


def build_spec(config: ContainerCreate, *, server_id: str, publish_ip: str) -> ContainerSpec:
    if not config.image.strip():
        raise InvalidRequest("image must not be empty")
    if config.networks and config.network_mode:
        raise InvalidRequest("give either network_mode or networks, not both")
    return ContainerSpec(
        image=config.image.strip(),
        name=config.name or None,
        command=config.command,
        working_dir=config.working_dir or None,
        environment=_environment(config.environment),
        ports=_ports(config.ports),
        publish_ip=publish_ip,
        volumes=_volumes(config.volumes),
        mem_limit=_memory(config.memory_limit),
        nano_cpus=_nano_cpus(config.cpu_limit),
        restart_policy=_restart_policy(config.restart_policy),
        network_mode=config.network_mode or None,
        networks=list(config.networks or []),
        labels=_labels(config, server_id),
        auto_remove=config.auto_remove,
    )


def _labels(config: ContainerCreate, server_id: str) -> dict[str, str]:
    user = dict(config.labels or {})
    forbidden = sorted(key for key in user if key.startswith(LABEL_PREFIX))
    if forbidden:
        raise ForbiddenLabel(f"labels starting with {LABEL_PREFIX!r} are reserved: {forbidden}", {"labels": forbidden})
    labels = {
        **user,
        LABEL_MANAGED: "true",
        LABEL_CONTROLLER: server_id,
        LABEL_SERVICE: config.service_id or "",
        LABEL_EPOCH: str(config.epoch or 0),
    }
    if config.health_check is not None:
        # On the container itself, so a restarted controller still knows what to probe.
        labels[LABEL_HEALTH_CHECK] = config.health_check.model_dump_json()
    return labels


def _environment(env: dict[str, str] | list[str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if isinstance(env, dict):
        return {str(key): str(value) for key, value in env.items()}
    result = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise InvalidRequest(f"environment entry {item!r} is not KEY=VALUE")
        result[key] = value
    return result


def _ports(ports: dict[str, int | None] | None) -> dict[str, int | None]:
    result: dict[str, int | None] = {}
    for key, host_port in (ports or {}).items():
        match = _PORT_RE.match(str(key).strip())
        if not match or not 1 <= int(match.group(1)) <= 65535:
            raise InvalidRequest(f"port {key!r} is not like '5000' or '5000/tcp'")
        if host_port is not None and not 0 <= host_port <= 65535:
            raise InvalidRequest(f"host port {host_port} for {key!r} is out of range")
        result[f"{match.group(1)}/{match.group(2) or 'tcp'}"] = host_port or None
    return result


def _volumes(volumes: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    result = {}
    for name, target in (volumes or {}).items():
        if not _VOLUME_RE.match(name):
            raise ForbiddenVolume(f"only named volumes can be mounted, not {name!r}", {"volume": name})
        if isinstance(target, str):
            bind, mode = target, "rw"
        elif isinstance(target, dict) and isinstance(target.get("bind"), str):
            bind, mode = target["bind"], target.get("mode", "rw")
        else:
            raise InvalidRequest(f"volume {name!r}: give a path or {{'bind': path, 'mode': 'rw'}}")
        if not posixpath.isabs(bind):
            raise InvalidRequest(f"volume {name!r}: mount point {bind!r} must be an absolute path")
        if mode not in ("rw", "ro"):
            raise InvalidRequest(f"volume {name!r}: mode must be 'rw' or 'ro'")
        result[name] = {"bind": bind, "mode": mode}
    return result


def _memory(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        size = parse_memory(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc), {"memory_limit": value}) from None
    if size > _MAX_MEMORY:
        raise InvalidRequest(f"memory_limit {value!r} is beyond any host", {"memory_limit": value})
    return size


def _nano_cpus(value: float | None) -> int | None:
    if value is None:
        return None
    if not math.isfinite(value) or not 0 < value <= _MAX_CPUS:
        raise InvalidRequest(f"cpu_limit must be a number of CPUs between 0 and {_MAX_CPUS}")
    return int(value * 1e9)


def _restart_policy(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        name = value.get("Name", value.get("name"))
        retries = value.get("MaximumRetryCount", value.get("maximum_retry_count", 0))
    else:
        name, _, count = value.partition(":")
        retries = count or 0
    try:
        retries = int(retries)
    except (TypeError, ValueError):
        raise InvalidRequest(f"restart policy retry count {retries!r} is not a number") from None
    if name not in _RESTART_NAMES:
        raise InvalidRequest(f"restart_policy must be one of {sorted(_RESTART_NAMES)}, not {name!r}")
    if retries < 0 or (retries and name != "on-failure"):
        raise InvalidRequest("a retry count applies to 'on-failure' only and must not be negative")
    return {"Name": name, "MaximumRetryCount": retries}
