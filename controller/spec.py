"""Turn a create request into a checked container specification.

Pure: no Docker here (only ``os.path.realpath`` for allow-listed host paths).
Everything a caller can get wrong is refused with a 422, and everything the
spec policy (``mmanager.policy``) forbids with a 403 ``SPEC_FORBIDDEN``, before
the daemon is asked for anything, so a bad request never leaves a half-made
container behind. The policy sees the request's unknown fields too: a
``privileged`` or ``pid_mode`` the wire model would silently drop is refused.

Every spec comes out hardened whatever was asked: ``no-new-privileges``, a
PID limit and a memory limit (the controller's default when none was given).
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from controller.errors import InvalidRequest, SpecForbidden
from mmanager.policy import (
    PolicyViolation,
    SpecPolicy,
    check_spec,
    command_problem,
    environment_problem,
    labels_problem,
    normalise_capability,
)
from mmanager.wire import (
    LABEL_CONTROLLER,
    LABEL_EPOCH,
    LABEL_HEALTH_CHECK,
    LABEL_MANAGED,
    LABEL_SERVICE,
    ContainerCreate,
    parse_memory,
)

_PORT_RE = re.compile(r"^(\d{1,5})(?:/(tcp|udp|sctp))?$")
_RESTART_NAMES = {"no", "always", "unless-stopped", "on-failure"}
# Far above any host, low enough that Docker's 64-bit fields hold them.
_MAX_CPUS = 4096
_MAX_MEMORY = 2**60
DEFAULT_PIDS_LIMIT = 4096
DEFAULT_MEMORY = 2 * 1024**3
# Processes in the container can never gain privileges (setuid binaries, file capabilities).
SECURITY_OPT = ("no-new-privileges:true",)
# What a batch job's container never gets of Docker's default capabilities: no device nodes, no changing
# its user or group, no setuid/setgid bits kept on the files it leaves in the host folders bound into it.
JOB_CAP_DROP = ("FSETID", "MKNOD", "SETGID", "SETUID")


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
    # volume name (or allow-listed host path, resolved) -> {"bind": path, "mode": "rw"|"ro"}
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    mem_limit: int | None = None
    nano_cpus: int | None = None
    restart_policy: dict[str, Any] | None = None
    network_mode: str | None = None
    networks: list[str] = field(default_factory=list)
    auto_remove: bool = False
    gpu_device_ids: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    pids_limit: int = DEFAULT_PIDS_LIMIT
    security_opt: tuple[str, ...] = SECURITY_OPT
    cap_drop: tuple[str, ...] = ()
    # Host paths this controller made itself (a job's folders, its input files in the model cache), never a
    # path a request named: bound as listed, read-write where ``read_only`` is False.
    own_mounts: tuple[OwnMount, ...] = ()


@dataclass(frozen=True)
class OwnMount:
    source: str
    target: str
    read_only: bool = True


def build_spec(
    config: ContainerCreate,
    *,
    server_id: str,
    publish_ip: str,
    policy: SpecPolicy | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    default_memory: int = DEFAULT_MEMORY,
) -> ContainerSpec:
    """``config.model_extra`` (a request read with ``extra="allow"``) is checked against the policy too."""
    image = config.image.strip()
    if not image:
        raise InvalidRequest("image must not be empty")
    if config.networks and config.network_mode:
        raise InvalidRequest("give either network_mode or networks, not both")
    environment = _environment(config.environment)
    for problem in (
        environment_problem(environment),
        labels_problem(config.labels or {}),
        command_problem(config.command),
    ):
        if problem:
            raise InvalidRequest(problem)
    ports = _ports(config.ports)
    volumes = _volumes(config.volumes)
    try:
        sources = check_spec(
            policy or SpecPolicy(),
            image=image,
            labels=config.labels,
            ports=ports,
            volume_sources=volumes,
            cap_add=config.cap_add,
            network_mode=config.network_mode,
            networks=config.networks,
            extra=config.model_extra,
            environment=environment,
        )
    except PolicyViolation as exc:
        raise SpecForbidden(exc.message, exc.details) from None
    return ContainerSpec(
        image=image,
        name=config.name or None,
        command=config.command,
        working_dir=config.working_dir or None,
        environment=environment,
        ports=ports,
        publish_ip=publish_ip,
        # Docker gets the path that was checked (symlinks resolved), not the one that was asked for.
        volumes={sources[source]: mount for source, mount in volumes.items()},
        mem_limit=_memory(config.memory_limit) or default_memory,
        nano_cpus=_nano_cpus(config.cpu_limit),
        restart_policy=_restart_policy(config.restart_policy),
        network_mode=config.network_mode or None,
        networks=list(config.networks or []),
        labels=_labels(config, server_id),
        auto_remove=config.auto_remove,
        cap_add=sorted({normalise_capability(cap) for cap in config.cap_add or ()}),
        pids_limit=pids_limit,
    )


def _labels(config: ContainerCreate, server_id: str) -> dict[str, str]:
    # Reserved mmanager.* keys were refused by the policy; these overwrite nothing of the caller's.
    user = dict(config.labels or {})
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
    retries: Any  # as the caller wrote it: int() below refuses what is not a count
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
