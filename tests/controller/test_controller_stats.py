"""Container monitoring on the controller, on the real Docker engine: a container burning CPU shows
on /metrics, in the listing and in heartbeats; its series go when it stops."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from functools import partial

import docker
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.errors import DockerUnavailable, NotFound
from controller.health import ControllerMetrics
from controller.runtime import Runtime
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
    """Just what the sampler reads: a listing, and stats that fail as told. Each ``tick()`` is a second of
    the host's one CPU, of which each container used ``cpu`` percent."""

    def __init__(self) -> None:
        self.running = ["a", "b"]
        self.failing: dict[str, Exception] = {}
        self.cpu = 10.0
        self.host = 0
        self.used: dict[str, int] = {}
        # Stopped since the listing: Docker answers zeros.
        self.stopped: set[str] = set()
        # Each container's StartedAt, when set.
        self.started: dict[str, str] = {}

    def tick(self) -> None:
        self.host += 10**9
        for cid in self.running:
            self.used[cid] = self.used.get(cid, 0) + int(self.cpu * 10**7)

    async def list_containers(self, *, all: bool, detailed: bool = True) -> list[ContainerInfo]:
        return [ContainerInfo(id=c, container_id=c, name=f"n-{c}", image="i", status="running", service_id=f"s-{c}")
                for c in self.running]

    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats:
        assert one_shot, "the sampler reads once a round"
        if container_id in self.failing:
            raise self.failing[container_id]
        if container_id in self.stopped:
            return ContainerStats(container_id=container_id, name=f"n-{container_id}", status="exited")
        return ContainerStats(container_id=container_id, name=f"n-{container_id}", status="running",
                              started_at=self.started.get(container_id), cpu_usage_ns=self.used.get(container_id, 0), system_cpu_usage_ns=self.host,
                              online_cpus=1, memory_usage=100, memory_limit=1000, memory_percent=10.0)


def _cpu(metrics: ControllerMetrics) -> dict[str, float]:
    found = samples(generate_latest(metrics.registry).decode(), "mmanager_container_cpu_percent")
    return {dict(labels)["container"]: value for labels, value in found.items()}


async def test_sampler_keeps_a_sample_through_a_failed_read_and_forgets_containers_that_went() -> None:
    runtime = _Runtime()
    metrics = ControllerMetrics("c1")
    sampler = StatsSampler(make_settings("c1", stats_interval=1), runtime, metrics)

    # A first reading gives no CPU figure: no sample rather than a 0 that is not true.
    runtime.tick()
    await sampler.run_once()
    assert sampler.usage("a") is None and _cpu(metrics) == {}
    runtime.tick()
    await sampler.run_once()
    assert _cpu(metrics) == {"n-a": 10.0, "n-b": 10.0}
    first = sampler.usage("a")
    assert first is not None and first.memory_bytes == 100 and first.memory_percent == 10.0

    runtime.cpu = 20.0
    runtime.tick()
    runtime.failing = {"a": DockerUnavailable("hiccup"), "b": NotFound("gone meanwhile")}
    await sampler.run_once()
    # A read that failed keeps the last sample; a container that vanished loses it and its series.
    assert sampler.usage("a") == first and sampler.usage("b") is None
    assert _cpu(metrics) == {"n-a": 10.0}

    runtime.failing, runtime.running = {}, ["b"]
    runtime.tick()
    await sampler.run_once()
    # b went (NotFound) and its previous reading with it: listed again, it starts afresh.
    assert sampler.usage("a") is None and sampler.usage("b") is None and _cpu(metrics) == {}
    runtime.tick()
    await sampler.run_once()
    assert _cpu(metrics) == {"n-b": 20.0}
    info = ContainerInfo(id="b", container_id="b", name="n-b", image="i", status="running")
    assert sampler.decorate(info).resource_usage["cpu_percent"] == 20.0


async def test_the_cpu_figure_is_the_delta_between_rounds_and_a_restart_starts_afresh() -> None:
    runtime = _Runtime()
    sampler = StatsSampler(make_settings("c1", stats_interval=1), runtime, ControllerMetrics("c1"))
    runtime.tick()
    await sampler.run_once()
    # Two seconds of the host between the rounds, 30 % and then 70 % of it: 50 % over the interval.
    runtime.cpu = 30.0
    runtime.tick()
    runtime.cpu = 70.0
    runtime.tick()
    await sampler.run_once()
    assert [sampler.usage(c).cpu_percent for c in "ab"] == [50.0, 50.0]  # type: ignore[union-attr]

    # a restarted under the same id: its CPU time counts from 0 again, so this round has no figure for it.
    runtime.used["a"] = 0
    runtime.tick()
    await sampler.run_once()
    assert sampler.usage("a") is None and sampler.usage("b") is not None
    runtime.tick()
    await sampler.run_once()
    assert [sampler.usage(c).cpu_percent for c in "ab"] == [70.0, 70.0]  # type: ignore[union-attr]

    # a stopped between the listing and its read (Docker's zeros), then started again: a first reading again,
    # never a figure against the zeros.
    runtime.stopped = {"a"}
    runtime.tick()
    await sampler.run_once()
    assert sampler.usage("a") is None and sampler.usage("b") is not None
    runtime.stopped, runtime.used["a"] = set(), 10**8
    runtime.tick()
    await sampler.run_once()
    assert sampler.usage("a") is None and sampler.usage("b") is not None


async def test_a_restart_in_place_starts_afresh_though_its_counter_passed_the_old_one() -> None:
    runtime = _Runtime()
    runtime.started = {"a": "2024-05-01T10:00:00Z", "b": "2024-05-01T10:00:00Z"}
    sampler = StatsSampler(make_settings("c1", stats_interval=1), runtime, ControllerMetrics("c1"))
    for _ in range(2):
        runtime.tick()
        await sampler.run_once()
    assert [sampler.usage(c).cpu_percent for c in "ab"] == [10.0, 10.0]  # type: ignore[union-attr]

    # a restarted under the same id between rounds, its new run already past its old one's CPU time (0.2 s):
    # only its StartedAt tells, and a delta against the old run's counter (20 %) would be wrong.
    runtime.started["a"] = "2024-05-01T10:00:02Z"
    runtime.used["a"] = 3 * 10**8
    runtime.tick()
    await sampler.run_once()
    assert sampler.usage("a") is None and sampler.usage("b") is not None
    runtime.tick()
    await sampler.run_once()
    assert [sampler.usage(c).cpu_percent for c in "ab"] == [10.0, 10.0]  # type: ignore[union-attr]


async def test_an_unexpected_failure_costs_one_containers_sample_and_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    runtime = _Runtime()
    metrics = ControllerMetrics("c1")
    sampler = StatsSampler(make_settings("c1", stats_interval=1), runtime, metrics)
    for _ in range(2):
        runtime.tick()
        await sampler.run_once()
    kept = sampler.usage("a")
    runtime.failing = {"a": ValueError("Expecting value: line 1 column 1 (char 0)")}
    with caplog.at_level(logging.DEBUG, logger="controller.stats"):
        for _ in range(3):
            runtime.tick()
            await sampler.run_once()
            # Every round went through: b sampled anew, a's previous sample kept.
            assert sampler.usage("a") == kept and sampler.usage("b") != kept
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.exc_info is not None) for r in failures] == [("WARNING", True)]
    assert "n-a" in failures[0].getMessage()

    # Read again, then failing again: logged again, once.
    runtime.failing = {}
    runtime.tick()
    await sampler.run_once()
    runtime.failing = {"a": ValueError("again")}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="controller.stats"):
        for _ in range(2):
            runtime.tick()
            await sampler.run_once()
    assert len(caplog.records) == 1


# -- on the real engine ------------------------------------------------------

IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


class _Removing:
    """The controller's own runtime, but the containers named in ``doomed`` are removed (by Docker, as a
    stop, delete, move or orphan removal would) while the round reads them: the removal and the read
    run at once, so Docker answers 404, 409 or an empty body, or the read lands first, as the race falls.
    Those in ``gone_first`` are removed after the listing and before their read, every time."""

    def __init__(self, runtime: Runtime, docker_client: docker.DockerClient) -> None:
        self.runtime = runtime
        self.docker = docker_client
        self.doomed: set[str] = set()
        self.gone_first: set[str] = set()

    async def list_containers(self, *, all: bool, detailed: bool = True) -> list[ContainerInfo]:
        return await self.runtime.list_containers(all=all, detailed=detailed)

    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats:
        remove = partial(self.docker.api.remove_container, container_id, force=True)
        if container_id in self.gone_first:
            await asyncio.to_thread(remove)
        if container_id not in self.doomed:
            return await self.runtime.stats(container_id, one_shot=one_shot)
        read, _ = await asyncio.gather(self.runtime.stats(container_id, one_shot=one_shot),
                                       asyncio.to_thread(remove), return_exceptions=True)
        if isinstance(read, BaseException):
            raise read
        return read


async def test_containers_removed_during_rounds_cost_only_their_own_samples(
        start_controller: StartController, example_image: str, docker_client: docker.DockerClient,
        caplog: pytest.LogCaptureFixture) -> None:
    ctl = await start_controller(stats_interval=0)  # its own sampler off: this test runs the rounds
    ids = []
    for n in range(8):
        r = await ctl.create(example_image, name=f"idle-{n}", command=IDLE, service_id=f"svc-{n}", epoch=1)
        assert r.status_code == 201, r.text
        ids.append(r.json()["container_id"])
    runtime = _Removing(ctl.app.state.runtime, docker_client)
    metrics = ControllerMetrics(ctl.server_id)
    sampler = StatsSampler(ctl.settings, runtime, metrics)  # type: ignore[arg-type]  # the runtime's reads, as a round uses them

    # Each round removes more containers while reading them (ids[5] after the listing, before its read: never
    # read); every other one's series goes on. One whose read beat its removal may keep this round's sample.
    removed: set[str] = set()
    caplog.set_level(logging.DEBUG, logger="controller")
    await sampler.run_once()  # each container's first reading
    for doomed, gone_first in (([], []), (ids[:2], []), (ids[2:4], [ids[5]]), ([ids[4]], []), ([], [])):
        runtime.doomed, runtime.gone_first = set(doomed), set(gone_first)
        started = datetime.now(UTC)
        await sampler.run_once()
        removed |= set(doomed) | set(gone_first)
        surviving = {cid for cid in ids if cid not in removed}
        fresh = {cid for cid in ids if (u := sampler.usage(cid)) is not None and u.sampled_at >= started}
        assert fresh - set(doomed) == surviving
        series = samples(generate_latest(metrics.registry).decode(), "mmanager_container_memory_bytes")
        named = {dict(labels)["container"] for labels in series}
        assert {f"idle-{ids.index(cid)}" for cid in surviving} == named - {f"idle-{ids.index(c)}" for c in doomed}
        if ids[5] in removed:
            assert sampler.usage(ids[5]) is None  # never read: no sample, though its read was asked
    assert not docker_client.containers.list(all=True, filters={"id": ids[:6]})
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_container_removed_while_docker_reads_it_is_not_found(
        start_controller: StartController, example_image: str, docker_client: docker.DockerClient) -> None:
    ctl = await start_controller(stats_interval=0)
    r = await ctl.create(example_image, name="going", command=IDLE)
    assert r.status_code == 201, r.text
    container_id = r.json()["container_id"]
    runtime: Runtime = ctl.app.state.runtime
    # Docker's two readings take a second: removed meanwhile, it closes the answer without a body. Whichever
    # way the race falls, the read is NotFound or, reaching Docker between the kill and the removal, a stopped
    # container's empty reading (no counters: the sampler takes no figure from it); never anything else.
    read = asyncio.ensure_future(runtime.stats(container_id))
    await asyncio.to_thread(docker_client.api.remove_container, container_id, force=True)
    try:
        stats = await read
    except NotFound:
        pass
    else:
        assert (stats.read, stats.cpu_usage_ns, stats.system_cpu_usage_ns) == ("0001-01-01T00:00:00Z", 0, 0)
    with pytest.raises(NotFound):
        await runtime.stats(container_id, one_shot=True)


async def test_the_one_shot_cpu_figure_is_dockers_own_for_a_steady_load(
        start_controller: StartController, example_image: str) -> None:
    ctl = await start_controller(stats_interval=0)
    r = await ctl.create(example_image, name="steady", command=BURN, cpu_limit=0.5)
    assert r.status_code == 201, r.text
    container_id = r.json()["container_id"]
    runtime: Runtime = ctl.app.state.runtime
    sampler = StatsSampler(ctl.settings, runtime, ControllerMetrics(ctl.server_id))

    async def steady() -> float | None:
        cpu = (await runtime.stats(container_id)).cpu_percent
        return cpu if cpu > 30 else None

    await eventually(steady, 20, "the burner at its half core", interval=0.1)
    # Docker's two readings (a second apart) fall between two one-shot rounds, which span them.
    pairs = []
    await sampler.run_once()
    for _ in range(3):
        docker_figure = (await runtime.stats(container_id)).cpu_percent
        await sampler.run_once()
        usage = sampler.usage(container_id)
        assert usage is not None
        pairs.append((usage.cpu_percent, docker_figure))
    for ours, dockers in pairs:
        assert 0 < ours <= 55 and abs(ours - dockers) <= 10, pairs
