"""The spec policy as a controller enforces it on its own, against the real Docker engine:
hostile create bodies sent straight to a controller are refused and create nothing; what it
does create is hardened."""

from __future__ import annotations

import os
from pathlib import Path

import docker

from examples.images import EXAMPLE_IMAGE
from tests.controller.conftest import Ctl, StartController
from tests.hostile_specs import CORPUS


def managed(client: docker.DockerClient, server_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"mmanager.controller={server_id}"})


async def test_every_hostile_spec_is_refused_by_the_controller_itself(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    problems = []
    for case in CORPUS:
        response = await ctl.create(**case.controller_body(example_image))
        problems.append(case.refusal_problem(response, case.controller_expect))
    assert [p for p in problems if p] == []
    assert managed(docker_client, ctl.server_id) == []
    # Each refusal is audited, queued for the hub's audit log (shipped with the next heartbeat).
    queued = (await ctl.client.get("/audit", params={"limit": 1000})).json()["events"]
    refused = [(e["method"], e["path"], e["status_code"], e["error_code"]) for e in queued if e["status_code"] >= 400]
    assert sorted(refused) == sorted(("POST", "/containers", *case.controller_expect) for case in CORPUS)


async def test_image_allow_list(start_controller: StartController, example_image: str) -> None:
    strict = await start_controller(allowed_images=["ghcr.io/lab", "registry.example.org"])
    refused = await strict.create(example_image)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["details"] == {"field": "image", "rule": "image"}

    repository = example_image.rsplit(":", 1)[0]
    allowing = await start_controller(allowed_images=["ghcr.io/lab", repository], server_id=strict.server_id)
    assert (await allowing.create(example_image)).status_code == 201


async def test_allow_listed_host_paths_are_mounted_resolved_and_links_out_refused(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    allowed = tmp_path / "datasets"
    (allowed / "genomes").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    os.symlink(secret, allowed / "escape")
    os.symlink(allowed / "genomes", tmp_path / "alias")
    ctl = await start_controller(allowed_host_paths=[str(allowed)])

    escape = await ctl.create(example_image, volumes={str(allowed / "escape"): "/data"})
    assert escape.status_code == 403, escape.text
    assert escape.json()["error"]["details"]["rule"] == "host_path"
    outside = await ctl.create(example_image, volumes={str(secret): "/data"})
    assert outside.status_code == 403

    # A link from outside into the allowed folder is fine: what counts is where it leads, and Docker gets that.
    # Asked read-write, it is mounted read-only all the same: nothing in the container can plant a link there.
    created = await ctl.create(example_image, volumes={str(tmp_path / "alias"): {"bind": "/data", "mode": "rw"}})
    assert created.status_code == 201, created.text
    attrs = docker_client.containers.get(created.json()["container_id"]).attrs
    [mount] = attrs["Mounts"]
    assert (mount["Type"], mount["Source"], mount["Destination"]) == ("bind", str(allowed / "genomes"), "/data")
    assert mount["RW"] is False
    assert len(managed(docker_client, ctl.server_id)) == 1


async def test_every_container_is_hardened(ctl: Ctl, example_image: str, docker_client: docker.DockerClient) -> None:
    """No memory limit asked: the default applies; allowed capabilities and low ports are what was asked."""
    plain = await ctl.create(example_image, cap_add=["ipc_lock", "CAP_CHOWN"])
    assert plain.status_code == 201, plain.text
    host = docker_client.containers.get(plain.json()["container_id"]).attrs["HostConfig"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["PidsLimit"] == ctl.settings.pids_limit == 4096
    assert host["Memory"] == 2 * 1024**3
    assert sorted(host["CapAdd"]) == ["CHOWN", "IPC_LOCK"]
    assert host["Privileged"] is False
    # No GPU asked: none visible, even where the NVIDIA runtime is Docker's default.
    env = docker_client.containers.get(plain.json()["container_id"]).attrs["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in env


async def test_settings_change_the_limits_and_allow_low_ports(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient
) -> None:
    ctl = await start_controller(pids_limit=64, default_memory_limit="96m", allow_low_ports=[990])
    created = await ctl.create(example_image, ports={"5000/tcp": 990})
    assert created.status_code == 201, created.text
    host = docker_client.containers.get(created.json()["container_id"]).attrs["HostConfig"]
    assert (host["PidsLimit"], host["Memory"]) == (64, 96 * 1024**2)
    assert host["PortBindings"]["5000/tcp"][0]["HostPort"] == "990"
    refused = await ctl.create(example_image, ports={"5000/tcp": 991})
    assert refused.status_code == 403 and refused.json()["error"]["details"]["rule"] == "low_port"


async def test_harmless_defaults_and_unknown_fields_are_accepted(fake_ctl: Ctl) -> None:
    """A client sending Docker's defaults, or fields of a newer wire version, asks for nothing dangerous."""
    response = await fake_ctl.create(
        EXAMPLE_IMAGE, privileged=False, cap_add=[], devices=[], security_opt=None, some_future_field={"x": 1}
    )
    assert response.status_code == 201, response.text


async def test_log_requests_are_bounded(fake_ctl: Ctl) -> None:
    created = (await fake_ctl.create(EXAMPLE_IMAGE)).json()
    response = await fake_ctl.client.get(f"/containers/{created['container_id']}/logs", params={"lines": 100_001})
    assert response.status_code == 422 and response.json()["error"]["code"] == "VALIDATION_ERROR"
