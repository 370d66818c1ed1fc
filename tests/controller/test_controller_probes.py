"""HTTP health probes: the rules over FakeRuntime with a mock HTTP transport, then the real thing on Docker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import docker
import httpx
import pytest

from controller.containers import ContainerService
from controller.fake import FakeRuntime
from controller.heartbeat import HeartbeatAgent
from controller.probes import Prober, probe_host
from controller.spec import build_spec
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import LABEL_HEALTH_CHECK, ContainerCreate, HealthCheck
from tests.controller.conftest import Ctl, make_settings
from tests.support.poll import eventually

# -- the rules, over the in-memory runtime ------------------------------------


@dataclass
class Services:
    """What the services answer: a status per host port (default 200 on /health, 404 elsewhere)."""

    status: dict[int, int] = field(default_factory=dict)
    slow: set[int] = field(default_factory=set)
    urls: list[str] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        port = request.url.port or 80
        if port in self.slow:
            await asyncio.sleep(2)
        default = 200 if request.url.path == "/health" else 404
        return httpx.Response(self.status.get(port, default))


@dataclass
class Rig:
    fake: FakeRuntime
    service: ContainerService
    prober: Prober
    services: Services

    async def create(self, ports: dict[str, int | None] | None = None, **check: object) -> str:
        config = ContainerCreate(
            image=EXAMPLE_IMAGE,
            ports={"5000/tcp": None} if ports is None else ports,
            health_check=HealthCheck(port=5000, **{"interval": 0.1, "start_period": 0, **check}),
        )
        return (await self.service.create(config)).container_id

    def host_port(self, container_id: str) -> int:
        port = self.fake.containers[container_id].host_ports["5000/tcp"]
        assert port is not None
        return port


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    settings = make_settings("fake-ctl")
    fake = FakeRuntime("fake-ctl")
    service = ContainerService(settings, fake, [])
    services = Services()
    prober = Prober(settings, fake, service, tick=0.02, transport=httpx.MockTransport(services.handle))
    prober.start()
    try:
        yield Rig(fake, service, prober, services)
    finally:
        await prober.stop()


async def test_a_passing_probe_makes_a_container_healthy(rig: Rig) -> None:
    container_id = await rig.create()
    assert rig.prober.health(container_id) == ("unknown", 0)
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    assert f"http://127.0.0.1:{rig.host_port(container_id)}/health" in rig.services.urls
    info = rig.prober.decorate(await rig.fake.get_container(container_id))
    assert (info.health, info.health_restarts) == ("healthy", 0)


async def test_an_unhealthy_container_is_restarted_in_place(rig: Rig) -> None:
    container_id = await rig.create(path="/nope", failure_threshold=2)
    await eventually(lambda: rig.prober.health(container_id)[1] >= 1, what="a health restart")
    assert rig.fake.containers[container_id].restarts >= 1
    assert rig.fake.containers[container_id].status == "running"
    # Judged afresh after the restart; the count stays.
    assert rig.prober.health(container_id)[0] in ("unknown", "unhealthy")
    await eventually(lambda: rig.prober.health(container_id)[1] >= 2, what="a second health restart")


async def test_failures_in_the_start_period_do_not_count(rig: Rig) -> None:
    container_id = await rig.create(path="/nope", failure_threshold=1, start_period=30)
    await asyncio.sleep(0.3)
    # Probed every tick all the same, so a service that comes up shows healthy at once.
    assert len(rig.services.urls) >= 5
    assert rig.prober.health(container_id) == ("unknown", 0)
    assert rig.fake.containers[container_id].restarts == 0


async def test_before_the_first_pass_failures_count_once_per_interval(rig: Rig) -> None:
    container_id = await rig.create(path="/nope", failure_threshold=2, interval=0.4)
    await asyncio.sleep(0.25)
    assert len(rig.services.urls) >= 5
    assert rig.prober.health(container_id) == ("unknown", 0)
    await eventually(lambda: rig.prober.health(container_id)[1] == 1, what="a health restart")


async def test_a_healthy_container_stays_healthy_until_the_threshold(rig: Rig) -> None:
    container_id = await rig.create(failure_threshold=3, interval=0.1)
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    rig.services.status[rig.host_port(container_id)] = 503
    await asyncio.sleep(0.15)
    assert rig.prober.health(container_id) == ("healthy", 0)
    await eventually(lambda: rig.prober.health(container_id)[1] == 1, what="a health restart")
    # It came back on another host port (the fake publishes anew), answering 200 again.
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy again")


async def test_one_slow_service_does_not_hold_up_the_others(rig: Rig) -> None:
    slow = await rig.create(timeout=5)
    rig.services.slow.add(rig.host_port(slow))
    quick = await rig.create()
    await eventually(lambda: rig.prober.health(quick)[0] == "healthy", within=1.5, what="the quick one healthy")
    assert rig.prober.health(slow)[0] == "unknown"


async def test_an_unpublished_port_is_probed_at_the_container_address(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def address(container_id: str) -> str:
        return "172.30.0.9"

    monkeypatch.setattr(rig.fake, "network_address", address)
    container_id = await rig.create(ports={})
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    assert "http://172.30.0.9:5000/health" in rig.services.urls


async def test_no_address_at_all_is_a_failure(rig: Rig) -> None:
    container_id = await rig.create(ports={}, failure_threshold=1)
    await eventually(lambda: rig.prober.health(container_id)[1] >= 1, what="a health restart")
    assert rig.services.urls == []


async def test_the_check_is_read_back_from_the_label_and_state_is_forgotten(rig: Rig) -> None:
    # A container from before a controller restart: only its label says what to probe.
    config = ContainerCreate(
        image=EXAMPLE_IMAGE, ports={"5000/tcp": None}, health_check=HealthCheck(port=5000, path="/health")
    )
    spec = build_spec(config, server_id="fake-ctl", publish_ip="")
    assert HealthCheck.model_validate_json(spec.labels[LABEL_HEALTH_CHECK]) == config.health_check
    old = rig.fake.add_container(spec, status="created")
    await rig.fake.start(old.id)
    await eventually(lambda: rig.prober.health(old.id)[0] == "healthy", what="healthy")
    # Without a check: unknown, and never probed.
    plain = (await rig.service.create(ContainerCreate(image=EXAMPLE_IMAGE))).container_id
    await asyncio.sleep(0.1)
    assert rig.prober.health(plain) == ("unknown", 0)
    assert plain not in rig.prober._probes

    await rig.service.remove(old.id, force=True)
    await eventually(lambda: old.id not in rig.prober._probes, what="forgotten")


async def test_a_stopped_container_is_unknown_and_keeps_its_count(rig: Rig) -> None:
    container_id = await rig.create(path="/nope", failure_threshold=1)
    await eventually(lambda: rig.prober.health(container_id)[1] >= 1, what="a health restart")
    await rig.service.stop(container_id, timeout=0)
    await eventually(lambda: rig.prober.health(container_id)[0] == "unknown", what="unknown once stopped")
    assert rig.prober.health(container_id)[1] >= 1


async def test_heartbeats_report_the_probes(rig: Rig) -> None:
    healthy = await rig.create()
    failing = await rig.create(path="/nope", failure_threshold=1)
    await eventually(
        lambda: rig.prober.health(healthy)[0] == "healthy" and rig.prober.health(failing)[1] >= 1, what="probed"
    )
    settings = make_settings("fake-ctl", hub_url="http://hub.test")
    beat = await HeartbeatAgent(settings, rig.fake, rig.service, rig.prober).build(7)
    by_id = {c.container_id: c for c in beat.containers}
    assert by_id[healthy].health == "healthy"
    assert by_id[failing].health_restarts >= 1
    assert beat.sequence == 7


def test_published_ports_are_reached_on_the_publish_address() -> None:
    assert probe_host("") == "127.0.0.1"
    assert probe_host("0.0.0.0") == "127.0.0.1"
    assert probe_host("::") == "127.0.0.1"
    assert probe_host("127.0.0.1") == "127.0.0.1"
    assert probe_host("10.0.0.5") == "10.0.0.5"


# -- on the real Docker engine -------------------------------------------------


def started_at(docker_client: docker.DockerClient, container_id: str) -> str:
    return docker_client.api.inspect_container(container_id)["State"]["StartedAt"]


async def test_a_real_service_becomes_healthy(ctl: Ctl, example_image: str, docker_client: docker.DockerClient) -> None:
    check = {"path": "/health", "port": 5000, "interval": 5, "start_period": 30}
    response = await ctl.create(example_image, ports={"5000/tcp": None}, health_check=check)
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    labels = docker_client.api.inspect_container(container_id)["Config"]["Labels"]
    assert json.loads(labels[LABEL_HEALTH_CHECK]) == HealthCheck.model_validate(check).model_dump()

    async def healthy() -> dict[str, Any] | None:
        info = (await ctl.client.get(f"/containers/{container_id}")).json()
        return info if info["health"] == "healthy" else None

    info = await eventually(healthy, 10, "the service healthy", interval=0.1)
    assert info["health_restarts"] == 0
    listed = (await ctl.client.get("/containers/")).json()["containers"]
    assert [(c["id"], c["health"]) for c in listed] == [(container_id, "healthy")]


async def test_a_real_unhealthy_service_is_restarted_in_place(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    check = {"path": "/nope", "port": 5000, "interval": 0.5, "failure_threshold": 2, "start_period": 0}
    response = await ctl.create(example_image, ports={"5000/tcp": None}, health_check=check)
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    first_start = started_at(docker_client, container_id)

    async def restarted() -> dict[str, Any] | None:
        info = (await ctl.client.get(f"/containers/{container_id}")).json()
        return info if info["health_restarts"] >= 1 else None

    info = await eventually(restarted, 15, "a health restart", interval=0.1)
    assert info["health"] in ("unknown", "unhealthy")
    # The same container, started again.
    assert started_at(docker_client, container_id) != first_start
    assert docker_client.api.inspect_container(container_id)["State"]["Running"] is True
