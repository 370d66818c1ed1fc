"""A corpus of hostile container specs, shared by the hub's and the controller's tests.

Each case has two forms:

- ``controller``: fields of a raw ``POST /containers/`` body (added to
  ``{"image": ...}``), as someone holding a controller key could send them
  straight to a controller, bypassing the hub;
- ``hub``: fields of a service spec (added to ``{"name": ..., "image": ...}``).
  Where the hub's spec cannot even express the field, the hub form is that
  field as an unknown key, which the hub refuses with 422.

A refusal is a 403 ``SPEC_FORBIDDEN`` whose details name the rule (see
``mmanager.policy``), or a 422 ``VALIDATION_ERROR`` for shape and size
problems. Nothing may be created either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

FORBIDDEN = (403, "SPEC_FORBIDDEN")
INVALID = (422, "VALIDATION_ERROR")


@dataclass(frozen=True)
class Hostile:
    id: str
    # mmanager.policy's rule name, or "size" for a bound (422 on both sides).
    rule: str
    controller: dict[str, Any]
    hub: dict[str, Any]
    hub_expect: tuple[int, str] = FORBIDDEN
    controller_expect: tuple[int, str] = FORBIDDEN

    def controller_body(self, image: str) -> dict[str, Any]:
        return {"image": image, **self.controller}

    def hub_body(self, image: str) -> dict[str, Any]:
        return {"name": f"h-{self.id}"[:63], "image": image, **self.hub}

    def refusal_problem(self, response: httpx.Response, expect: tuple[int, str]) -> str | None:
        """What is wrong with a refusal of this spec (hub or controller: ``expect`` says which), or None."""
        status, code = expect
        body = response.json()
        if response.status_code != status or body.get("error", {}).get("code") != code:
            return f"{self.id}: {response.status_code} {response.text[:300]}"
        if code == "SPEC_FORBIDDEN" and body["error"]["details"]["rule"] != self.rule:
            return f"{self.id}: refused by rule {body['error']['details']['rule']!r}, expected {self.rule!r}"
        return None


def _everywhere(id: str, rule: str, **fields: Any) -> Hostile:
    """A field both sides know by the same name: both refuse it by policy."""
    return Hostile(id, rule, controller=fields, hub=fields)


def _controller_only(id: str, rule: str, **fields: Any) -> Hostile:
    """A Docker knob only a raw controller body can carry; the hub does not know the field at all."""
    return Hostile(id, rule, controller=fields, hub=fields, hub_expect=INVALID)


def _both(id: str, rule: str, controller: dict[str, Any], hub: dict[str, Any]) -> Hostile:
    return Hostile(id, rule, controller=controller, hub=hub)


_BIG = "x" * 40_000

CORPUS: list[Hostile] = [
    # privileges
    _controller_only("privileged", "privileged", privileged=True),
    _controller_only("privileged-docker-name", "privileged", Privileged=True),
    _controller_only("raw-host-config", "host_knob", HostConfig={"Privileged": True, "PidMode": "host"}),
    # capabilities
    _everywhere("cap-sys-admin", "capabilities", cap_add=["SYS_ADMIN"]),
    _everywhere("cap-all", "capabilities", cap_add=["ALL"]),
    _everywhere("cap-net-admin-prefixed", "capabilities", cap_add=["CAP_NET_ADMIN"]),
    _everywhere("cap-sys-ptrace-lower", "capabilities", cap_add=["sys_ptrace"]),
    _everywhere("cap-sys-module-among-allowed", "capabilities", cap_add=["CHOWN", "SYS_MODULE"]),
    _controller_only("capabilities-field", "capabilities", capabilities=["SYS_ADMIN"]),
    # host namespaces
    _controller_only("network-host", "host_namespace", network_mode="host"),
    _controller_only("network-container", "host_namespace", network_mode="container:mmanager-hub"),
    _controller_only("networks-host", "host_namespace", networks=["host"]),
    _controller_only("pid-host", "host_namespace", pid_mode="host"),
    _controller_only("pid-container", "host_namespace", pid_mode="container:other"),
    _controller_only("ipc-host", "host_namespace", ipc_mode="host"),
    _controller_only("uts-host", "host_namespace", uts_mode="host"),
    _controller_only("userns-host", "host_namespace", userns_mode="host"),
    _controller_only("cgroupns-host", "host_namespace", cgroupns="host"),
    # devices (GPUs only by count or id, through the controller's own device requests)
    _controller_only("devices", "devices", devices=["/dev/sda:/dev/sda:rwm"]),
    _controller_only(
        "device-requests", "devices", device_requests=[{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    ),
    _controller_only("device-cgroup-rules", "devices", device_cgroup_rules=["a *:* rwm"]),
    # security options
    _controller_only("seccomp-unconfined", "security_options", security_opt=["seccomp=unconfined"]),
    _controller_only("apparmor-unconfined", "security_options", security_opt=["apparmor=unconfined"]),
    _controller_only("selinux-label-disable", "security_options", security_opt=["label=disable"]),
    _controller_only("systempaths-unconfined", "security_options", security_opt=["systempaths=unconfined"]),
    # host paths
    _controller_only("binds", "host_path", binds=["/:/host:rw"]),
    _controller_only("mounts", "host_path", mounts=[{"Type": "bind", "Source": "/", "Target": "/host"}]),
    _everywhere("volume-etc", "host_path", volumes={"/etc": "/x"}),
    _both(
        "docker-socket",
        "host_path",
        controller={"volumes": {"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}}},
        hub={"volumes": {"/var/run/docker.sock": "/var/run/docker.sock"}},
    ),
    _everywhere("volume-host-root", "host_path", volumes={"/": "/host"}),
    _everywhere("volume-relative-path", "host_path", volumes={"../../etc": "/x"}),
    _everywhere("volume-traversal", "host_path", volumes={"/var/lib/docker/volumes/../../../etc": "/x"}),
    # reserved labels
    _everywhere("label-managed", "reserved_label", labels={"mmanager.managed": "false"}),
    _everywhere("label-controller", "reserved_label", labels={"team": "x", "mmanager.controller": "someone-else"}),
    _everywhere("label-service", "reserved_label", labels={"mmanager.service": "another-users-service"}),
    # low host ports
    _both("low-port-ssh", "low_port", controller={"ports": {"22/tcp": 22}}, hub={"ports": {"22": 22}}),
    _both("low-port-http", "low_port", controller={"ports": {"5000/tcp": 80}}, hub={"ports": {"5000": 80}}),
    # host knobs
    _controller_only("sysctls", "host_knob", sysctls={"kernel.shm_rmid_forced": "1"}),
    _controller_only("cgroup-parent", "host_knob", cgroup_parent="/"),
    _controller_only("volume-driver", "host_knob", volume_driver="local"),
    _controller_only("volumes-from", "host_knob", volumes_from=["mmanager-hub"]),
    _controller_only("runtime", "host_knob", runtime="runc"),
    _controller_only("oom-kill-disable", "host_knob", oom_kill_disable=True),
    _controller_only("pids-unlimited", "host_knob", pids_limit=-1),
    _controller_only("ulimits", "host_knob", ulimits=[{"Name": "memlock", "Soft": -1, "Hard": -1}]),
    # GPUs by environment: on a server whose default runtime is NVIDIA's these alone expose every GPU
    _both("gpu-env-all", "gpu_environment", controller={"environment": {"NVIDIA_VISIBLE_DEVICES": "all"}},
          hub={"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}),
    _both("gpu-env-list-form", "gpu_environment", controller={"environment": ["NVIDIA_VISIBLE_DEVICES=0,1"]},
          hub={"env": {"nvidia_visible_devices": "0"}}),
    _both("gpu-env-capabilities", "gpu_environment",
          controller={"environment": {"NVIDIA_DRIVER_CAPABILITIES": "all"}},
          hub={"env": {"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}}),
    _both("gpu-env-disable-require", "gpu_environment", controller={"environment": {"NVIDIA_DISABLE_REQUIRE": "1"}},
          hub={"env": {"NVIDIA_REQUIRE_CUDA": "cuda>=1.0"}}),
    # sizes: 422 on both sides
    Hostile(
        "env-too-many",
        "size",
        controller={"environment": {f"V{i}": "1" for i in range(300)}},
        hub={"env": {f"V{i}": "1" for i in range(300)}},
        hub_expect=INVALID,
        controller_expect=INVALID,
    ),
    Hostile(
        "env-too-large",
        "size",
        controller={"environment": {"A": _BIG, "B": _BIG, "C": _BIG, "D": _BIG}},
        hub={"env": {"A": _BIG}},
        hub_expect=INVALID,
        controller_expect=INVALID,
    ),
    Hostile(
        "command-too-long",
        "size",
        controller={"command": ["sh", "-c", _BIG]},
        hub={"command": ["sh", "-c", _BIG]},
        hub_expect=INVALID,
        controller_expect=INVALID,
    ),
]

assert len({case.id for case in CORPUS}) == len(CORPUS), "case ids must be unique"
