"""The container spec policy: what no caller may ask of a Docker daemon.

A controller's Docker daemon is root on its server, so a container spec is a
request for a slice of root. The hub checks every spec against these rules
before it writes anything, and every controller checks every create again
(whoever sent it: our hub, a GeoML-Hub backend, or someone holding a key),
so a hostile spec is refused even when it bypasses the hub.

Pure: no I/O, except ``os.path.realpath`` when a host path is checked with
``resolve_paths`` on (the controller, which sees the host's file system; the
hub only normalises paths lexically and refuses ``..``).

Two kinds of problem:

- ``PolicyViolation`` (403 ``SPEC_FORBIDDEN``; ``details`` name the field and
  the rule): the request is well formed, and refused on purpose;
- ``size_problem``-style bounds (env, labels, command) are shape problems and
  answer 422 like any other invalid input.

The rules (each a ``rule`` name in the refusal's details):

- ``privileged``: never;
- ``capabilities``: only those in ``ALLOWED_CAPABILITIES`` may be added;
- ``host_namespace``: no host (or another container's) network, PID, IPC,
  UTS, cgroup or user namespace;
- ``devices``: no devices, device requests or device cgroup rules; GPUs are
  requested by count or id (``gpu_count``/``gpu_device_ids``) and the
  controller makes the device request itself for the GPUs it assigned;
- ``host_path``: named volumes only, plus host paths under an admin
  allow-list (symlinks resolved on the controller);
- ``security_options``: no caller-given security options at all (the
  controller sets ``no-new-privileges`` itself); that covers
  ``seccomp=unconfined``, ``apparmor=unconfined``, ``label=disable`` and
  ``systempaths=unconfined`` without a list of bad values to keep current;
- ``reserved_label``: ``mmanager.*`` labels are the controller's;
- ``low_port``: no host port below 1024 unless the admin allows that port;
- ``host_knob``: no sysctls, cgroup parent, volume drivers, volumes from
  other containers, mounts, runtimes, OOM-killer or PID-limit overrides,
  ulimits, swap or kernel memory settings, or a raw ``HostConfig``;
- ``image``: with an image allow-list, only images under one of its prefixes;
- ``gpu_environment``: no ``NVIDIA_VISIBLE_DEVICES``, ``NVIDIA_DRIVER_CAPABILITIES``,
  ``NVIDIA_REQUIRE_*`` or ``NVIDIA_DISABLE_REQUIRE``: on a server whose default
  runtime is NVIDIA's, these alone would hand a container every GPU, other
  users' included; GPUs come only from ``gpu_count`` and the controller's assignment.

Host paths that pass are always mounted read-only (the controller enforces it): a
container that could write into an allowed folder could plant a symlink there that
Docker follows on the next start, and mount the host's root.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmanager.wire import LABEL_PREFIX

SPEC_FORBIDDEN = "SPEC_FORBIDDEN"

# Docker grants these to every container already (moby's default set), so
# naming one in cap_add changes nothing; refusing them would only break specs
# that spell the defaults out. IPC_LOCK lets a process pin memory (CUDA, NCCL
# and RDMA pinned buffers); what it pins still counts against its memory limit.
# Left out on purpose: SYS_NICE (it allows real-time scheduling, which the CFS
# CPU limit does not bound, so one container could starve its neighbours),
# and everything that reaches the kernel or the host: SYS_ADMIN, NET_ADMIN,
# SYS_PTRACE, SYS_MODULE, SYS_RAWIO, DAC_READ_SEARCH, BPF, PERFMON...
DOCKER_DEFAULT_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
ALLOWED_CAPABILITIES = DOCKER_DEFAULT_CAPABILITIES | {"IPC_LOCK"}

# Docker's own rule for volume names; anything else would be a bind mount of a host path.
VOLUME_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")  # used with fullmatch: no trailing newline

# Bounds on what a spec carries (422 beyond them): far above what a model service needs,
# low enough that no request can make a daemon or a database row carry megabytes.
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 128 * 1024
MAX_LABELS = 64
MAX_LABEL_KEY = 256
MAX_LABEL_VALUE = 4096
MAX_COMMAND_ARGS = 1024
MAX_COMMAND_BYTES = 32 * 1024
LOW_PORT_LIMIT = 1024

# Docker create options that reach the host, by normalised name (lower case, no '_' or '-'),
# so "cap_add", "CapAdd" and "cap-add" are one. The wire model ignores unknown fields; a
# controller looks for these among them and refuses the request instead of dropping them.
_HOST_FIELDS: dict[str, str] = {
    "privileged": "privileged",
    "capadd": "capabilities",
    "capabilities": "capabilities",
    "devices": "devices",
    "devicerequests": "devices",
    "devicecgrouprules": "devices",
    "securityopt": "security_options",
    "securityopts": "security_options",
    "pidmode": "host_namespace",
    "ipcmode": "host_namespace",
    "utsmode": "host_namespace",
    "usernsmode": "host_namespace",
    "cgroupns": "host_namespace",
    "cgroupnsmode": "host_namespace",
    "pid": "host_namespace",
    "ipc": "host_namespace",
    "uts": "host_namespace",
    "userns": "host_namespace",
    "binds": "host_path",
    "mounts": "host_path",
    "mount": "host_path",
    "sysctls": "host_knob",
    "cgroupparent": "host_knob",
    "cgroup": "host_knob",
    "volumedriver": "host_knob",
    "volumesfrom": "host_knob",
    "runtime": "host_knob",
    "oomkilldisable": "host_knob",
    "oomscoreadj": "host_knob",
    "pidslimit": "host_knob",
    "ulimits": "host_knob",
    "memswaplimit": "host_knob",
    "memoryswap": "host_knob",
    "kernelmemory": "host_knob",
    "groupadd": "host_knob",
    "isolation": "host_knob",
    "hostconfig": "host_knob",
}


class PolicyViolation(Exception):
    """A spec refused on purpose; each side maps it to its own 403 ``SPEC_FORBIDDEN`` error."""

    code = SPEC_FORBIDDEN
    status_code = 403

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.message = message

    @property
    def details(self) -> dict[str, str]:
        return {"field": self.field, "rule": self.rule}


@dataclass(frozen=True)
class SpecPolicy:
    """The admin's knobs; the defaults are the strict policy.

    ``allowed_images``: registry or repository prefixes (``ghcr.io/lab``,
    ``registry.example.org``, ``python``); empty allows any image.
    ``allowed_host_paths``: host folders that may be mounted (with everything
    below them). ``allowed_low_ports``: host ports below 1024 that may be
    published. ``resolve_paths``: resolve symlinks of host paths (only where
    the host's file system is, on the controller).
    """

    allowed_images: tuple[str, ...] = ()
    allowed_host_paths: tuple[str, ...] = ()
    allowed_low_ports: frozenset[int] = field(default_factory=frozenset)
    resolve_paths: bool = False


def comma_list(value: Any) -> Any:
    """``a, b,,c`` -> ``["a", "b", "c"]`` for settings given as comma-separated environment variables."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# -- the whole spec -----------------------------------------------------------------


def check_spec(
    policy: SpecPolicy,
    *,
    image: str,
    labels: Mapping[str, str] | None = None,
    ports: Mapping[str, int | None] | None = None,
    volume_sources: Iterable[str] = (),
    cap_add: Iterable[str] | None = None,
    network_mode: str | None = None,
    networks: Iterable[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Check one container spec; raise ``PolicyViolation`` at the first rule it breaks.

    ``extra``: the request's fields the wire model does not know (the
    controller passes them; the hub refuses unknown fields before this).
    Returns each volume source as it must be given to Docker: a named volume
    unchanged, an allowed host path normalised (and resolved, with
    ``resolve_paths``), so Docker mounts exactly the folder that was checked.
    """
    check_extra_fields(extra or {})
    check_image(policy, image)
    check_labels(labels or {})
    check_environment(environment or {})
    check_network(network_mode, networks)
    check_capabilities(cap_add or ())
    check_host_ports(policy, ports or {})
    return {source: volume_source(policy, source) for source in volume_sources}


def check_extra_fields(extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        rule = _HOST_FIELDS.get(re.sub(r"[_\-\s]", "", str(key)).lower())
        # A client that sends Docker's defaults (privileged: false, cap_add: []) asks for nothing.
        if rule is not None and value not in (None, False, "", [], {}, 0):
            raise PolicyViolation(str(key), rule, f"{key!r} is not accepted: it reaches the host ({rule})")


def check_labels(labels: Mapping[str, str]) -> None:
    reserved = sorted(key for key in labels if key.lower().startswith(LABEL_PREFIX))
    if reserved:
        raise PolicyViolation(
            f"labels.{reserved[0]}", "reserved_label", f"labels starting with {LABEL_PREFIX!r} are reserved: {reserved}"
        )


# The NVIDIA container runtime reads these to decide which GPUs a container sees.
_GPU_VARIABLES = re.compile(r"NVIDIA_(VISIBLE_DEVICES|DRIVER_CAPABILITIES|REQUIRE_.*|DISABLE_REQUIRE|MIG_.*)",
                            re.IGNORECASE)


def check_environment(environment: Mapping[str, str]) -> None:
    for key in environment:
        if _GPU_VARIABLES.fullmatch(str(key).strip()):
            raise PolicyViolation(
                f"env.{key}", "gpu_environment",
                f"{key} is set by the controller for the GPUs it assigns; ask for GPUs with gpu_count instead",
            )


def check_network(network_mode: str | None, networks: Iterable[str] | None) -> None:
    for where, mode in [("network_mode", network_mode), *(("networks", n) for n in networks or ())]:
        if mode and (mode.strip().lower() == "host" or mode.strip().lower().startswith("container:")):
            raise PolicyViolation(
                where, "host_namespace", f"{where} {mode!r} would share the host's or another container's network"
            )


def normalise_capability(name: str) -> str:
    name = name.strip().upper()
    return name[4:] if name.startswith("CAP_") else name


def check_capabilities(cap_add: Iterable[str]) -> list[str]:
    caps = [normalise_capability(cap) for cap in cap_add]
    refused = sorted({cap for cap in caps if cap not in ALLOWED_CAPABILITIES})
    if refused:
        raise PolicyViolation(
            "cap_add",
            "capabilities",
            f"capabilities {refused} may not be added; allowed: {sorted(ALLOWED_CAPABILITIES)}",
        )
    return sorted(set(caps))


def check_host_ports(policy: SpecPolicy, ports: Mapping[str, int | None]) -> None:
    for key, host_port in ports.items():
        if host_port and 0 < host_port < LOW_PORT_LIMIT and host_port not in policy.allowed_low_ports:
            raise PolicyViolation(
                f"ports.{key}",
                "low_port",
                f"host port {host_port} is below {LOW_PORT_LIMIT}; leave it empty for a free port, or ask an admin "
                "to allow it (MMANAGER_ALLOW_LOW_PORTS)",
            )


# -- images ---------------------------------------------------------------------------


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def normalise_image(reference: str) -> str:
    """A reference the way Docker reads it: ``python:3.12`` -> ``docker.io/library/python:3.12``."""
    reference = reference.strip()
    first, slash, rest = reference.partition("/")
    if slash and _looks_like_registry(first):
        registry, path = first.lower(), rest
    else:
        registry, path = "docker.io", reference
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = "docker.io"
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return f"{registry}/{path}"


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if "/" not in prefix and _looks_like_registry(prefix):
        registry = prefix.lower()
        return "docker.io" if registry in ("index.docker.io", "registry-1.docker.io") else registry
    return normalise_image(prefix)


def image_allowed(allowed: Iterable[str], image: str) -> bool:
    """Is ``image`` under one of the prefixes? A prefix matches whole path components only:
    ``ghcr.io/lab`` allows ``ghcr.io/lab/model:1`` and ``ghcr.io/lab:2``, never ``ghcr.io/lab-evil/x``."""
    prefixes = [_normalise_prefix(p) for p in allowed if p.strip()]
    if not prefixes:
        return True
    name = normalise_image(image)
    return any(name == p or (name.startswith(p) and name[len(p)] in "/:@") for p in prefixes)


def check_image(policy: SpecPolicy, image: str) -> None:
    if not image_allowed(policy.allowed_images, image):
        raise PolicyViolation(
            "image", "image", f"image {image!r} is not under an allowed prefix ({', '.join(policy.allowed_images)})"
        )


# -- volumes --------------------------------------------------------------------------


def volume_source(policy: SpecPolicy, source: str) -> str:
    """A named volume as it is; a host path only under an allowed folder (see ``check_spec``)."""
    if VOLUME_NAME_RE.fullmatch(source):
        return source
    field_name = f"volumes.{source}"
    if not policy.allowed_host_paths:
        raise PolicyViolation(field_name, "host_path", f"only named volumes can be mounted, not {source!r}")
    if not posixpath.isabs(source) or "\x00" in source or ".." in source.split("/"):
        raise PolicyViolation(field_name, "host_path", f"host path {source!r} must be absolute, without '..'")
    path = posixpath.normpath(source)
    if policy.resolve_paths:
        # Symlinks resolved on both sides: a link inside an allowed folder that points out of it is refused.
        path = os.path.realpath(path)
        allowed = [os.path.realpath(posixpath.normpath(p)) for p in policy.allowed_host_paths]
    else:
        allowed = [posixpath.normpath(p) for p in policy.allowed_host_paths]
    if not any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed):
        raise PolicyViolation(field_name, "host_path", f"host path {source!r} is not under an allowed host path")
    return path


# -- sizes (422, not policy) -------------------------------------------------------------


def environment_problem(env: Mapping[str, str]) -> str | None:
    if len(env) > MAX_ENV_VARS:
        return f"at most {MAX_ENV_VARS} environment variables, not {len(env)}"
    total = 0
    for key, value in env.items():
        size = len(str(value).encode())
        if size > MAX_ENV_VALUE_BYTES:
            return f"environment variable {str(key)[:64]!r} is larger than {MAX_ENV_VALUE_BYTES} bytes"
        total += len(str(key).encode()) + size
    if total > MAX_ENV_TOTAL_BYTES:
        return f"the environment is larger than {MAX_ENV_TOTAL_BYTES} bytes in all"
    return None


def labels_problem(labels: Mapping[str, str]) -> str | None:
    if len(labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels, not {len(labels)}"
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY:
            return f"label keys must have 1 to {MAX_LABEL_KEY} characters"
        if len(str(value)) > MAX_LABEL_VALUE:
            return f"label {key[:64]!r} is longer than {MAX_LABEL_VALUE} characters"
    return None


def command_problem(command: str | list[str] | None) -> str | None:
    if command is None:
        return None
    args = [command] if isinstance(command, str) else command
    if len(args) > MAX_COMMAND_ARGS:
        return f"a command has at most {MAX_COMMAND_ARGS} arguments"
    if sum(len(str(a).encode()) for a in args) > MAX_COMMAND_BYTES:
        return f"a command is at most {MAX_COMMAND_BYTES} bytes long"
    return None
