"""``DockerRuntime.create_container`` builds its request with the SDK's public calls
(``create_host_config``, ``create_container``): these are the bodies Docker receives for a spec, the same as
the SDK's own ``containers.create`` sends. No daemon: the client's last public step is replaced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest

from controller.config import ControllerSettings
from controller.runtime import DockerRuntime
from controller.spec import ContainerSpec

_LOGS = {"Type": "json-file", "Config": {"max-size": "50m", "max-file": "3"}}
# What every container config carries whatever the spec (the SDK's defaults).
_ALWAYS = {"Tty": False, "OpenStdin": False, "StdinOnce": False, "AttachStdin": False, "AttachStdout": True,
           "AttachStderr": True, "NetworkDisabled": False}


class Sent:
    def __init__(self, client: docker.DockerClient, info: dict[str, Any]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        client.api.create_container_from_config = self.create  # the request's last step
        client.api.connect_container_to_network = self.connect
        client.info = lambda: info  # the daemon's runtimes

    def create(self, config: dict[str, Any], name: str | None, platform: str | None = None) -> dict[str, str]:
        # The SDK posts the config without its top-level None values.
        self.calls.append(("create", {k: v for k, v in config.items() if v is not None}, name))
        return {"Id": "cid"}

    def connect(self, container: str, network: str) -> None:
        self.calls.append(("connect", container, network))


@pytest.fixture
async def runtime() -> AsyncIterator[DockerRuntime]:
    runtime = DockerRuntime(ControllerSettings(_env_file=None, api_key="k" * 32, server_id="s1", gpu_devices=[]))
    yield runtime
    await runtime.close()


async def create(runtime: DockerRuntime, spec: ContainerSpec, info: dict[str, Any]) -> list[tuple[Any, ...]]:
    # An explicit API version: the client asks the (absent) daemon for nothing.
    client = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.45")
    sent = Sent(client, info)
    runtime._client = client
    assert await runtime.create_container(spec) == "cid"
    return sent.calls


async def test_a_full_spec(runtime: DockerRuntime) -> None:
    spec = ContainerSpec(
        image="reg/img:2", labels={"a": "b"}, name="svc-1", command=["python", "-m", "x"], working_dir="/app",
        environment={"K": "V", "Z": "1"}, ports={"8000/tcp": None, "9000/udp": 9001}, publish_ip="127.0.0.1",
        volumes={"data": {"bind": "/data", "mode": "rw"}, "/srv/models": {"bind": "/models", "mode": "rw"}},
        mem_limit=2**30, nano_cpus=1_500_000_000, restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
        networks=["front", "back"], auto_remove=True, gpu_device_ids=["0", "1"], cap_add=["NET_ADMIN"])
    config = {
        "ExposedPorts": {"8000/tcp": {}, "9000/udp": {}}, **_ALWAYS, "Env": ["K=V", "Z=1"],
        "Cmd": ["python", "-m", "x"], "Image": "reg/img:2", "WorkingDir": "/app",
        "HostConfig": {
            "Memory": 1073741824, "NetworkMode": "front",
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3},
            "CapAdd": ["NET_ADMIN"], "SecurityOpt": ["no-new-privileges:true"],
            "PortBindings": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
                             "9000/udp": [{"HostIp": "127.0.0.1", "HostPort": "9001"}]},
            "LogConfig": _LOGS, "PidsLimit": 4096, "AutoRemove": True, "NanoCpus": 1500000000,
            "Mounts": [{"Target": "/data", "Source": "data", "Type": "volume", "ReadOnly": False},
                       {"Target": "/models", "Source": "/srv/models", "Type": "bind", "ReadOnly": True}],
            "DeviceRequests": [{"Driver": "", "Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]],
                                "Options": {}}],
            "CgroupnsMode": "private",
        },
        "NetworkingConfig": {"front": None},
        "Labels": {"a": "b"},
    }
    assert await create(runtime, spec, {"Runtimes": {"nvidia": {}, "runc": {}}}) == [
        ("create", config, "svc-1"), ("connect", "cid", "back")]


async def test_a_plain_spec(runtime: DockerRuntime) -> None:
    spec = ContainerSpec(image="img", labels={}, command="sleep 1", ports={"80/tcp": 8080}, network_mode="bridge",
                         gpu_device_ids=["2"])
    config = {
        "ExposedPorts": {"80/tcp": {}}, **_ALWAYS, "Env": ["NVIDIA_VISIBLE_DEVICES=2"], "Cmd": ["sleep", "1"],
        "Image": "img",
        "HostConfig": {"NetworkMode": "bridge", "SecurityOpt": ["no-new-privileges:true"],
                       "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]},
                       "LogConfig": _LOGS, "PidsLimit": 4096, "CgroupnsMode": "private"},
        "Labels": {},
    }
    assert await create(runtime, spec, {"Runtimes": {"runc": {}}}) == [("create", config, None)]
