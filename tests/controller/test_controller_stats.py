"""Container monitoring on the controller, on the real Docker engine: a container burning CPU shows
on /metrics, in the listing and in heartbeats; its series go when it stops."""

from __future__ import annotations

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.errors import DockerUnavailable, NotFound
from controller.health import ControllerMetrics
from controller.schemas import ContainerStats
from controller.stats import StatsSampler
from mmanager.wire import ContainerInfo, Heartbeat, HeartbeatAnswer, HeartbeatContainer
from tests.controller.conftest import StartController, make_settings
from tests.support.poll import eventually

BURN = ["sh", "-c", "trap 'exit 0' TERM; while :; do :; done"]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    }


async def test_a_busy_container_shows_on_metrics_listing_and_heartbeats(start_controller: StartController,
                                                                        example_image: str) -> None:
    beats: list[Heartbeat] = []

    async def hub(request: httpx.Request) -> httpx.Response:
        beats.append(Heartbeat.model_validate_json(request.content))
        return httpx.Response(200, json=HeartbeatAnswer(interval=0.3, grace=5).model_dump(mode="json"))

    ctl = await start_controller(stats_interval=0.5, hub_url="http://hub.test",
                                 hub_transport=httpx.MockTransport(hub))
    await eventually(lambda: len(beats) >= 2, what="a heartbeat round trip")
    r = await ctl.create(example_image, name="burner", command=BURN, service_id="svc-burn", epoch=1,
                         cpu_limit=1.0, memory_limit="64m")
    assert r.status_code == 201, r.text
    container_id = r.json()["container_id"]
    labels = (("container", "burner"), ("controller", ctl.server_id), ("service", "svc-burn"))

    async def burning() -> str | None:
        text = (await ctl.client.get("/metrics")).text
        return text if samples(text, "mmanager_container_cpu_percent").get(labels, 0) > 50 else None

    text = await eventually(burning, 15, "the burner's cpu above 50 % on /metrics", interval=0.3)
    memory = samples(text, "mmanager_container_memory_bytes")[labels]
    assert 0 < memory <= 64 * 2**20
    assert 0 < samples(text, "mmanager_container_memory_percent")[labels] <= 100
    for name in ("network_rx_bytes", "network_tx_bytes", "block_read_bytes", "block_write_bytes"):
        assert labels in samples(text, f"mmanager_container_{name}")
    [(disk_labels, disk)] = samples(text, "mmanager_disk_usage_percent").items()
    assert disk_labels == (("controller", ctl.server_id),) and 0 < disk < 100

    # For a hub that polls: the listing carries the same sample.
    [listed] = (await ctl.client.get("/containers/")).json()["containers"]
    assert listed["resource_usage"]["cpu_percent"] > 50
    # For a hub that is pushed to: the heartbeat does, and the controller's disk use.
    def beat_with_usage() -> tuple[Heartbeat, HeartbeatContainer] | None:
        beat = beats[-1]
        entries = [c for c in beat.containers
                   if c.container_id == container_id and c.usage is not None and c.usage.cpu_percent > 50]
        return (beat, entries[0]) if entries else None

    beat, entry = await eventually(beat_with_usage, 5, "a heartbeat carrying the burner's usage")
    assert entry.usage is not None and entry.usage.memory_bytes > 0
    # The same measure (the disk may fill a little in between: other work shares it).
    assert beat.health.disk_usage_percent is not None and abs(beat.health.disk_usage_percent - disk) < 2

    r = await ctl.client.post(f"/containers/{container_id}/stop", params={"timeout": 2})
    assert r.status_code == 200, r.text
    async def series_gone() -> bool:
        return labels not in samples((await ctl.client.get("/metrics")).text, "mmanager_container_cpu_percent")

    await eventually(series_gone, 5, "the stopped container's series to go", interval=0.2)
    [listed] = (await ctl.client.get("/containers/", params={"all": "true"})).json()["containers"]
    assert listed["resource_usage"] is None


class _Runtime:
    """Just what the sampler reads: a listing, and stats that fail as told."""

    def __init__(self) -> None:
        self.running = ["a", "b"]
        self.failing: dict[str, Exception] = {}
        self.cpu = 10.0

    async def list_containers(self, *, all: bool, detailed: bool = True) -> list[ContainerInfo]:
        return [ContainerInfo(id=c, container_id=c, name=f"n-{c}", image="i", status="running", service_id=f"s-{c}")
                for c in self.running]

    async def stats(self, container_id: str) -> ContainerStats:
        if container_id in self.failing:
            raise self.failing[container_id]
        return ContainerStats(container_id=container_id, name=f"n-{container_id}", status="running",
                              cpu_percent=self.cpu, memory_usage=100, memory_limit=1000, memory_percent=10.0)


async def test_sampler_keeps_a_sample_through_a_failed_read_and_forgets_containers_that_went() -> None:
    runtime = _Runtime()
    metrics = ControllerMetrics("c1")
    sampler = StatsSampler(make_settings("c1", stats_interval=1), runtime, metrics)

    def cpu() -> dict[str, float]:
        found = samples(generate_latest(metrics.registry).decode(), "mmanager_container_cpu_percent")
        return {dict(labels)["container"]: value for labels, value in found.items()}

    await sampler.run_once()
    assert cpu() == {"n-a": 10.0, "n-b": 10.0}
    first = sampler.usage("a")
    assert first is not None and first.memory_bytes == 100 and first.memory_percent == 10.0

    runtime.cpu = 20.0
    runtime.failing = {"a": DockerUnavailable("hiccup"), "b": NotFound("gone meanwhile")}
    await sampler.run_once()
    # A read that failed keeps the last sample; a container that vanished loses it and its series.
    assert sampler.usage("a") == first and sampler.usage("b") is None
    assert cpu() == {"n-a": 10.0}

    runtime.failing, runtime.running = {}, ["b"]
    await sampler.run_once()
    assert sampler.usage("a") is None and cpu() == {"n-b": 20.0}
    info = ContainerInfo(id="b", container_id="b", name="n-b", image="i", status="running")
    assert sampler.decorate(info).resource_usage["cpu_percent"] == 20.0
