"""Golden-inference probes in the controller's prober: the rules over FakeRuntime with a mock HTTP
transport, then on the real Docker engine with a service that answers a fixed JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import docker
import httpx
import pytest

from controller import probes
from controller.containers import ContainerService
from controller.fake import FakeRuntime
from controller.heartbeat import HeartbeatAgent
from controller.probes import Prober
from controller.spec import build_spec
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import LABEL_HEALTH_CHECK, ContainerCreate, GoldenProbe, HealthCheck, probe_failed
from tests.controller.conftest import Ctl, make_settings
from tests.support.poll import eventually
from tests.support.probe_image import GOOD, build_probe_image

EXPECT = {"data": {"prediction": 0.4123}}


@dataclass
class Model:
    """What the services answer: /health 200; POST /predict the JSON ``answer`` (or ``status``)."""

    answer: Any = field(default_factory=lambda: {"success": True, "data": {"prediction": 0.41231, "label": "p"}})
    status: int = 200
    # POSTs to fail to connect before answering.
    refuse: int = 0
    posts: list[Any] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.method == "POST" and request.url.path == "/predict":
            if self.refuse > 0:
                self.refuse -= 1
                raise httpx.ConnectError("connection refused", request=request)
            self.posts.append(json.loads(request.content))
            self.timeouts.append(request.extensions["timeout"]["read"])
            if isinstance(self.answer, bytes):
                return httpx.Response(self.status, content=self.answer)
            return httpx.Response(self.status, json=self.answer)
        return httpx.Response(404)


@dataclass
class Rig:
    fake: FakeRuntime
    service: ContainerService
    prober: Prober
    model: Model

    async def create(self, expect: Any = None, **check: Any) -> str:
        probe = GoldenProbe(path="/predict", body={"sequence": "ACGT"}, expect=EXPECT if expect is None else expect)
        config = ContainerCreate(
            image=EXAMPLE_IMAGE, ports={"5000/tcp": None},
            health_check=HealthCheck(port=5000, probe=probe, **{"interval": 0.1, "start_period": 0, **check}),
        )
        return (await self.service.create(config)).container_id


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(probes, "PROBE_PAUSE", 0.01)
    settings = make_settings("fake-ctl")
    fake = FakeRuntime("fake-ctl")
    service = ContainerService(settings, fake, [])
    model = Model()
    prober = Prober(settings, fake, service, tick=0.02, transport=httpx.MockTransport(model.handle))
    prober.start()
    try:
        yield Rig(fake, service, prober, model)
    finally:
        await prober.stop()


async def test_a_right_answer_makes_it_healthy_and_is_asked_once_a_start(rig: Rig) -> None:
    container_id = await rig.create()
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    assert rig.model.posts == [{"sequence": "ACGT"}]
    assert rig.prober.report(container_id) == ("healthy", 0, None)
    # Not periodic: only /health is probed from then on.
    await asyncio.sleep(0.3)
    assert len(rig.model.posts) == 1
    # A restart (the API's, or Docker's) asks again.
    await rig.service.restart(container_id, timeout=0)
    rig.prober.started(container_id)
    await eventually(lambda: len(rig.model.posts) == 2, what="the probe asked again after a restart")
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy again")


async def test_healthy_only_once_the_probe_passes_too(rig: Rig) -> None:
    rig.model.refuse = 10**6
    container_id = await rig.create(start_period=30)
    await asyncio.sleep(0.3)
    # /health passes, the inference does not answer: not healthy (and, within its start period, not judged).
    assert rig.prober.report(container_id) == ("unknown", 0, None)
    rig.model.refuse = 0
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")


async def test_a_wrong_answer_is_unhealthy_at_once_and_never_restarted(rig: Rig) -> None:
    rig.model.answer = {"success": True, "data": {"prediction": 0.9871, "label": "p"}}
    container_id = await rig.create(failure_threshold=1)
    await eventually(lambda: rig.prober.health(container_id)[0] == "unhealthy", what="unhealthy")
    health, restarts, detail = rig.prober.report(container_id)
    assert detail == "probe /predict: data.prediction: expected 0.4123, got 0.9871"
    assert probe_failed(detail)
    await asyncio.sleep(0.5)
    # Neither probed again nor restarted: a restart cannot fix wrong weights.
    assert rig.prober.report(container_id) == ("unhealthy", 0, detail)
    assert rig.fake.containers[container_id].restarts == 0
    assert len(rig.model.posts) == 1
    info = rig.prober.decorate(await rig.fake.get_container(container_id))
    assert (info.health, info.health_detail) == ("unhealthy", detail)
    beat = await HeartbeatAgent(make_settings("fake-ctl", hub_url="http://hub.test"), rig.fake, rig.service,
                                rig.prober).build(1)
    [entry] = [c for c in beat.containers if c.container_id == container_id]
    assert (entry.health, entry.health_detail) == ("unhealthy", detail)
    # Started again (by the hub, or by hand): judged afresh, and now it answers right.
    rig.model.answer = {"data": {"prediction": 0.4123}}
    await rig.service.restart(container_id, timeout=0)
    rig.prober.started(container_id)
    await eventually(lambda: rig.prober.report(container_id) == ("healthy", 0, None), what="healthy after a start")


async def test_an_answer_from_before_a_restart_never_judges_the_new_start(rig: Rig) -> None:
    # The first probe's POST is held in flight; the old process's answer is right.
    held, release = asyncio.Event(), asyncio.Event()
    handle = rig.model.handle

    async def slow(request: httpx.Request) -> httpx.Response:
        response = await handle(request)
        if request.method == "POST" and not release.is_set():
            held.set()
            await release.wait()
        return response

    rig.prober._transport = httpx.MockTransport(slow)
    await rig.prober.stop()
    rig.prober.start()
    container_id = await rig.create(failure_threshold=1)
    await asyncio.wait_for(held.wait(), 5)
    # Restarted meanwhile onto weights that answer wrong: the answer in flight speaks for the old process.
    await rig.service.restart(container_id, timeout=0)
    rig.prober.started(container_id)
    rig.model.answer = {"success": True, "data": {"prediction": 0.9871, "label": "p"}}
    seen: list[str] = []

    async def watch() -> None:
        while True:
            seen.append(rig.prober.health(container_id)[0])
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        release.set()
        await eventually(lambda: rig.prober.health(container_id)[0] == "unhealthy", what="unhealthy")
    finally:
        watcher.cancel()
    assert "healthy" not in seen, seen
    assert rig.prober.report(container_id)[2] == "probe /predict: data.prediction: expected 0.4123, got 0.9871"


@pytest.mark.parametrize(("status", "answer", "detail"), [
    (500, {"error": "boom"}, "probe /predict: HTTP 500"),
    (422, {"error": "bad"}, "probe /predict: HTTP 422"),
    (200, b"not json", "probe /predict: the answer is not JSON"),
    (200, {"data": {}}, "probe /predict: data.prediction: missing (expected 0.4123)"),
    (200, {"data": {"prediction": True}}, "probe /predict: data.prediction: expected 0.4123, got true"),
])
async def test_other_wrong_answers(rig: Rig, status: int, answer: Any, detail: str) -> None:
    rig.model.status, rig.model.answer = status, answer
    container_id = await rig.create()
    await eventually(lambda: rig.prober.health(container_id)[0] == "unhealthy", what="unhealthy")
    assert rig.prober.report(container_id) == ("unhealthy", 0, detail)


async def test_a_failed_connection_is_tried_again_then_counts_as_a_failed_check(rig: Rig) -> None:
    # Two refusals, then an answer: within one probe's attempts.
    rig.model.refuse = probes.PROBE_ATTEMPTS - 1
    container_id = await rig.create(failure_threshold=1)
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    assert rig.fake.containers[container_id].restarts == 0
    # Never an answer: a failed health probe, so restarted in place like one (and judged afresh).
    rig.model.refuse = 10**6
    other = await rig.create(failure_threshold=1)
    await eventually(lambda: rig.prober.health(other)[1] >= 1, what="a health restart")
    assert rig.fake.containers[other].restarts >= 1


async def test_an_inference_has_more_time_than_the_check(rig: Rig) -> None:
    container_id = await rig.create(timeout=1)
    await eventually(lambda: rig.prober.health(container_id)[0] == "healthy", what="healthy")
    assert rig.model.timeouts == [max(1 * probes.PROBE_TIMEOUT_FACTOR, probes.PROBE_MIN_TIMEOUT)]


async def test_the_probe_is_read_back_from_the_label(rig: Rig) -> None:
    # A container from before a controller restart: only its label says what to ask.
    probe = GoldenProbe(path="/predict", body={"sequence": "ACGT"}, expect={"data": {"prediction": 0.5}},
                        tolerance=0.01)
    config = ContainerCreate(image=EXAMPLE_IMAGE, ports={"5000/tcp": None},
                             health_check=HealthCheck(port=5000, interval=0.1, start_period=0, probe=probe))
    spec = build_spec(config, server_id="fake-ctl", publish_ip="")
    assert HealthCheck.model_validate_json(spec.labels[LABEL_HEALTH_CHECK]).probe == probe
    old = rig.fake.add_container(spec, status="created")
    await rig.fake.start(old.id)
    await eventually(lambda: rig.prober.health(old.id)[0] == "unhealthy", what="unhealthy")
    assert rig.prober.report(old.id)[2] == "probe /predict: data.prediction: expected 0.5, got 0.41231"


# -- on the real Docker engine -------------------------------------------------


@pytest.fixture(scope="session")
def probe_image(docker_client: docker.DockerClient) -> str:
    return build_probe_image(docker_client)


async def _create(ctl: Ctl, image: str, prediction: float) -> str:
    check = {"path": "/health", "port": 5000, "interval": 0.5, "start_period": 30,
             "probe": {"path": "/cgi-bin/predict", "body": {"sequence": "ACGT"},
                       "expect": {"data": {"prediction": GOOD, "label": "promoter"}}, "tolerance": 1e-6}}
    response = await ctl.create(image, ports={"5000/tcp": None}, health_check=check,
                                environment={"PREDICTION": str(prediction)})
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


async def test_a_real_service_that_answers_right_is_healthy(ctl: Ctl, probe_image: str,
                                                            docker_client: docker.DockerClient) -> None:
    container_id = await _create(ctl, probe_image, GOOD)
    labels = docker_client.api.inspect_container(container_id)["Config"]["Labels"]
    assert json.loads(labels[LABEL_HEALTH_CHECK])["probe"]["path"] == "/cgi-bin/predict"

    async def healthy() -> dict[str, Any] | None:
        info = (await ctl.client.get(f"/containers/{container_id}")).json()
        return info if info["health"] == "healthy" else None

    info = await eventually(healthy, 15, "the service healthy", interval=0.1)
    assert "health_detail" not in info


async def test_a_real_service_that_answers_wrong_is_unhealthy_and_left_alone(
    ctl: Ctl, probe_image: str, docker_client: docker.DockerClient
) -> None:
    container_id = await _create(ctl, probe_image, 0.9871)
    first_start = docker_client.api.inspect_container(container_id)["State"]["StartedAt"]

    async def unhealthy() -> dict[str, Any] | None:
        info = (await ctl.client.get(f"/containers/{container_id}")).json()
        return info if info["health"] == "unhealthy" else None

    info = await eventually(unhealthy, 15, "the service unhealthy", interval=0.1)
    assert info["health_detail"] == "probe /cgi-bin/predict: data.prediction: expected 0.4123, got 0.9871"
    await asyncio.sleep(1.5)
    info = (await ctl.client.get(f"/containers/{container_id}")).json()
    assert (info["health"], info["health_restarts"]) == ("unhealthy", 0)
    assert docker_client.api.inspect_container(container_id)["State"]["StartedAt"] == first_start
    listed = {c["id"]: c for c in (await ctl.client.get("/containers/")).json()["containers"]}
    assert listed[container_id]["health_detail"] == info["health_detail"]
    # The API's restart judges it afresh at once.
    response = await ctl.client.post(f"/containers/{container_id}/restart", params={"timeout": 1})
    assert response.status_code == 200, response.text
    assert docker_client.api.inspect_container(container_id)["State"]["StartedAt"] != first_start
    await eventually(unhealthy, 15, "unhealthy again after the restart (still wrong)", interval=0.1)
