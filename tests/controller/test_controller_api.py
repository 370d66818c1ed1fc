"""The container lifecycle through the controller API, on the real Docker engine."""

from __future__ import annotations

import asyncio

import docker
import httpx
import pytest

from tests.controller.conftest import Ctl, StartController
from tests.support.net import free_port
from tests.support.poll import eventually


async def get_when_up(url: str, within: float = 5.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=2) as client:
        return await eventually(lambda: client.get(url), within, f"an answer from {url}", interval=0.05,
                                retry_on=(httpx.TransportError,))


def managed(docker_client: docker.DockerClient, server_id: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={server_id}"})


async def test_create_starts_a_labelled_limited_container(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    response = await ctl.create(
        example_image,
        name=f"{ctl.server_id}-web",
        ports={"5000/tcp": None},
        memory_limit="64m",
        cpu_limit=0.5,
        environment={"MODEL_NAME": "dnabert2"},
        labels={"team": "bio"},
        restart_policy="unless-stopped",
        service_id="svc-1",
        epoch=3,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "running"
    assert body["created"] is True and body["success"] is True
    assert (body["name"], body["service_id"], body["epoch"]) == (f"{ctl.server_id}-web", "svc-1", 3)

    attrs = docker_client.api.inspect_container(body["container_id"])
    image_labels = docker_client.images.get(attrs["Config"]["Image"]).labels
    container_labels = {k: v for k, v in attrs["Config"]["Labels"].items() if k not in image_labels}
    assert container_labels == {
        "team": "bio",
        "mmanager.managed": "true",
        "mmanager.controller": ctl.server_id,
        "mmanager.service": "svc-1",
        "mmanager.epoch": "3",
    }
    assert attrs["HostConfig"]["Memory"] == 64 * 1024**2
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert "MODEL_NAME=dnabert2" in attrs["Config"]["Env"]
    assert attrs["HostConfig"]["PortBindings"]["5000/tcp"][0]["HostIp"] == "127.0.0.1"

    port = body["ports"]["5000/tcp"]
    assert (await get_when_up(f"http://127.0.0.1:{port}/health")).json() == {"status": "healthy"}
    assert (await get_when_up(f"http://127.0.0.1:{port}/model/info")).json()["name"] == "example"

    info = (await ctl.client.get(f"/containers/{body['container_id']}")).json()
    assert info["status"] == "running"
    assert (info["memory_limit"], info["cpu_limit"]) == (64 * 1024**2, 0.5)
    assert info["ports"] == {"5000/tcp": port}
    listing = (await ctl.client.get("/containers/")).json()["containers"]
    assert [c["container_id"] for c in listing] == [body["container_id"]]


async def test_geoml_hub_container_config_is_accepted(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    """The body exactly as GeoML-Hub's model service builds it: no service_id, a fixed host port."""
    port = free_port()
    config = {
        "name": f"{ctl.server_id}-geoml",
        "image": example_image,
        "command": None,
        "working_dir": "/www",
        "environment": {"GRADIO_SERVER_PORT": str(port), "EXAMPLES_PATH": "/app/examples"},
        "ports": {"5000/tcp": port},
        "volumes": {},
        "memory_limit": "256m",
        "cpu_limit": 1.0,
        "restart_policy": "unless-stopped",
        "network_mode": None,
        "networks": [],
        "labels": {"geoml.service_name": "x", "geoml.created_by": "geoml-backend"},
        "auto_remove": False,
        "detach": True,
    }
    response = await ctl.client.post("/containers/", json=config)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ports"] == {"5000/tcp": port}
    labels = docker_client.api.inspect_container(body["container_id"])["Config"]["Labels"]
    assert (labels["mmanager.managed"], labels["mmanager.service"], labels["mmanager.epoch"]) == ("true", "", "0")
    assert (await get_when_up(f"http://127.0.0.1:{port}/health")).status_code == 200
    # GeoML-Hub reads `success` from start and stop answers.
    stop = await ctl.client.post(f"/containers/{body['container_id']}/stop", params={"timeout": 0})
    assert stop.json()["success"] is True
    start = await ctl.client.post(f"/containers/{body['container_id']}/start")
    assert start.json()["success"] is True and start.json()["status"] == "running"


async def test_create_is_idempotent_on_service_and_epoch(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    first = (await ctl.create(example_image, service_id="svc-idem", epoch=1)).json()
    again = await ctl.create(example_image, service_id="svc-idem", epoch=1)
    assert again.status_code == 200
    assert again.json()["container_id"] == first["container_id"] and again.json()["created"] is False

    # A repeat after the container stopped starts it again rather than making another.
    await ctl.client.post(f"/containers/{first['container_id']}/stop", params={"timeout": 0})
    revived = (await ctl.create(example_image, service_id="svc-idem", epoch=1)).json()
    assert (revived["container_id"], revived["status"], revived["created"]) == (first["container_id"], "running", False)
    assert len(managed(docker_client, ctl.server_id)) == 1


async def test_concurrent_duplicate_creates_make_one_container(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    responses = await asyncio.gather(*(ctl.create(example_image, service_id="svc-race", epoch=2) for _ in range(4)))
    bodies = [r.json() for r in responses]
    assert len({b["container_id"] for b in bodies}) == 1
    assert sorted(b["created"] for b in bodies) == [False, False, False, True]
    assert len(managed(docker_client, ctl.server_id)) == 1


async def test_older_epochs_are_fenced(ctl: Ctl, example_image: str) -> None:
    old = (await ctl.create(example_image, service_id="svc-f", epoch=1)).json()["container_id"]
    new = (await ctl.create(example_image, service_id="svc-f", epoch=2)).json()["container_id"]

    stale = await ctl.create(example_image, service_id="svc-f", epoch=1)
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "STALE_EPOCH"
    assert stale.json()["error"]["details"]["current_epoch"] == 2

    for call in (
        ctl.client.post(f"/containers/{new}/restart", params={"epoch": 1, "timeout": 0}),
        ctl.client.post(f"/containers/{new}/stop", params={"epoch": 1}),
        ctl.client.delete(f"/containers/{new}", params={"epoch": 1}),
    ):
        assert (await call).json()["error"]["code"] == "STALE_EPOCH"

    # The stale copy may be stopped and removed, never started again.
    assert (await ctl.client.post(f"/containers/{old}/stop", params={"timeout": 0})).status_code == 200
    refused = await ctl.client.post(f"/containers/{old}/start")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "STALE_EPOCH")
    assert (await ctl.client.delete(f"/containers/{old}")).status_code == 200
    assert (await ctl.client.post(f"/containers/{new}/restart", params={"epoch": 2, "timeout": 0})).status_code == 200


async def test_epochs_are_remembered_across_a_controller_restart(
    start_controller: StartController, example_image: str
) -> None:
    first = await start_controller()
    assert (await first.create(example_image, service_id="svc-r", epoch=5)).status_code == 201
    # A fresh controller process (same SERVER_ID) learns epoch 5 from the labels.
    second = await start_controller()
    response = await second.create(example_image, service_id="svc-r", epoch=4)
    assert (response.status_code, response.json()["error"]["code"]) == (409, "STALE_EPOCH")


async def test_max_containers_counts_stopped_ones_too(start_controller: StartController, example_image: str) -> None:
    ctl = await start_controller(max_containers=2)
    ids = [(await ctl.create(example_image)).json()["container_id"] for _ in range(2)]
    await ctl.client.post(f"/containers/{ids[0]}/stop", params={"timeout": 0})
    refused = await ctl.create(example_image)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "CAPACITY_EXCEEDED"
    assert (await ctl.client.delete(f"/containers/{ids[0]}")).status_code == 200
    assert (await ctl.create(example_image)).status_code == 201


async def test_concurrent_creates_never_exceed_max_containers(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient
) -> None:
    ctl = await start_controller(max_containers=2)
    responses = await asyncio.gather(*(ctl.create(example_image, service_id=f"svc-cap-{i}", epoch=1) for i in range(4)))
    codes = sorted((r.status_code, r.json().get("error", {}).get("code")) for r in responses)
    assert codes == [(201, None), (201, None), (409, "CAPACITY_EXCEEDED"), (409, "CAPACITY_EXCEEDED")]
    assert len(managed(docker_client, ctl.server_id)) == 2


# No image can have the second name (Docker answers its create with 400, "invalid reference format"):
# nothing is pulled. The first is pulled, and its registry cannot be resolved.
@pytest.mark.parametrize(("image", "status", "code"), [("registry.invalid/none:latest", 502, "IMAGE_PULL_FAILED"),
                                                       ("Not/A::Reference", 404, "IMAGE_NOT_FOUND")])
async def test_unknown_image_is_refused_fast_and_leaves_nothing(
    ctl: Ctl, docker_client: docker.DockerClient, image: str, status: int, code: str
) -> None:
    response = await asyncio.wait_for(ctl.create(image, name=f"{ctl.server_id}-ghost"), 10)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["details"]["image"] == image
    if code == "IMAGE_PULL_FAILED":
        assert image in error["message"] and "registry.invalid" in error["details"]["registry"]
    assert managed(docker_client, ctl.server_id) == []


async def test_a_container_that_will_not_start_is_removed(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    response = await ctl.create(example_image, command=["/no/such/binary"])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "START_FAILED"
    assert managed(docker_client, ctl.server_id) == []


async def test_name_conflict(ctl: Ctl, example_image: str) -> None:
    name = f"{ctl.server_id}-dup"
    assert (await ctl.create(example_image, name=name)).status_code == 201
    response = await ctl.create(example_image, name=name)
    assert (response.status_code, response.json()["error"]["code"]) == (409, "NAME_CONFLICT")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"memory_limit": "lots"}, "VALIDATION_ERROR"),
        ({"memory_limit": "-2g"}, "VALIDATION_ERROR"),
        ({"cpu_limit": 0}, "VALIDATION_ERROR"),
        ({"restart_policy": "sometimes"}, "VALIDATION_ERROR"),
        ({"ports": {"http": None}}, "VALIDATION_ERROR"),
        ({"epoch": -1}, "VALIDATION_ERROR"),
        ({"environment": ["NOEQUALS"]}, "VALIDATION_ERROR"),
    ],
)
async def test_bad_create_bodies_are_422(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient, body: dict, code: str
) -> None:
    response = await ctl.create(example_image, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert managed(docker_client, ctl.server_id) == []


async def test_malformed_requests_get_the_error_envelope(ctl: Ctl) -> None:
    no_image = await ctl.client.post("/containers/", json={"name": "x"})
    assert no_image.status_code == 422 and no_image.json()["error"]["code"] == "VALIDATION_ERROR"
    not_json = await ctl.client.post("/containers/", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["error"]["code"] == "VALIDATION_ERROR"
    bad_query = await ctl.client.post("/containers/abc/stop", params={"timeout": "soon"})
    assert bad_query.status_code == 422 and bad_query.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_stop_start_restart_delete(ctl: Ctl, example_image: str, docker_client: docker.DockerClient) -> None:
    cid = (await ctl.create(example_image, ports={"5000": None})).json()["container_id"]
    stopped = await ctl.client.post(f"/containers/{cid}/stop", params={"timeout": 0})
    assert stopped.json() == {
        "success": True,
        "container_id": cid,
        "status": "exited",
        "message": stopped.json()["message"],
    }
    assert (await ctl.client.get("/containers/", params={"all": "false"})).json()["containers"] == []
    assert len((await ctl.client.get("/containers/", params={"all": "true"})).json()["containers"]) == 1

    assert (await ctl.client.post(f"/containers/{cid}/start")).json()["status"] == "running"
    started_at = docker_client.api.inspect_container(cid)["State"]["StartedAt"]
    restarted = await ctl.client.post(f"/containers/{cid}/restart", params={"timeout": 0})
    assert restarted.json()["status"] == "running"
    assert docker_client.api.inspect_container(cid)["State"]["StartedAt"] != started_at

    refused = await ctl.client.delete(f"/containers/{cid}", params={"force": "false"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "CONFLICT")
    removed = await ctl.client.delete(f"/containers/{cid}", params={"force": "true"})
    assert removed.json()["status"] == "removed"
    gone = await ctl.client.get(f"/containers/{cid}")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "NOT_FOUND")


async def test_containers_of_others_are_invisible_and_untouched(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    mine = (await ctl.create(example_image)).json()["container_id"]
    strangers = [
        docker_client.containers.run(example_image, detach=True),
        docker_client.containers.run(
            example_image,
            detach=True,
            labels={"mmanager.managed": "true", "mmanager.controller": f"{ctl.server_id}-other"},
        ),
    ]
    try:
        listing = (await ctl.client.get("/containers/", params={"all": "true"})).json()["containers"]
        assert [c["container_id"] for c in listing] == [mine]
        for stranger in strangers:
            for method, path in [
                ("GET", ""),
                ("GET", "/logs"),
                ("GET", "/stats"),
                ("POST", "/stop"),
                ("POST", "/restart"),
                ("DELETE", ""),
            ]:
                for ref in (stranger.id, stranger.name):
                    response = await ctl.client.request(method, f"/containers/{ref}{path}")
                    assert response.status_code == 404, (method, path, response.text)
                    assert response.json()["error"]["code"] == "NOT_FOUND"
            stranger.reload()
            assert stranger.status == "running"
    finally:
        for stranger in strangers:
            stranger.remove(force=True)


async def test_trailing_slashes_are_optional_and_never_redirect(ctl: Ctl, example_image: str) -> None:
    without = await ctl.client.post("/containers", json={"image": example_image})
    with_slash = await ctl.client.post("/containers/", json={"image": example_image})
    assert (without.status_code, with_slash.status_code) == (201, 201)
    cid = without.json()["container_id"]
    for path in (f"/containers/{cid}", f"/containers/{cid}/", "/containers", "/images", "/images/", "/health/"):
        response = await ctl.client.get(path)
        assert response.status_code == 200, path
    assert (await ctl.client.post(f"/containers/{cid}/stop/", params={"timeout": 0})).status_code == 200
