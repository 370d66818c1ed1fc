"""The traffic and GPU history on PostgreSQL and SQLite: the recorder's rounds over gateways' expositions
(two gateways, one restarting, one new) land as requests, 5xx and latency quantiles in the service's
buckets, in the same rows as the heartbeats' resource samples whichever is written first; a bucket with
traffic and no sample has no resource values; a round whose write failed is counted by the next; a GPU controller's samples (fake NVML) give the bucket's
peak VRAM and mean utilisation, and a CPU service has none."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from controller.fake import FakeRuntime
from controller.gpu import LABEL_GPUS
from controller.gpu_monitor import GpuMonitor
from controller.health import ControllerMetrics
from controller.spec import ContainerSpec
from controller.stats import StatsSampler
from hub.background import traffic_history
from hub.background.traffic_history import TrafficRecorder
from hub.config import HubSettings
from hub.db import Database
from hub.metrics import HubMetrics
from hub.models import ServiceMetricModel, ServiceModel, UserModel
from hub.services.monitoring import Bucket, Monitor, _upsert_metrics, service_history
from hub.services.traffic import Traffic, parse
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED, LABEL_SERVICE, HeartbeatContainer
from tests.controller.conftest import make_settings
from tests.hub.conftest import KEY
from tests.hub.test_monitoring import _report, any_db  # noqa: F401  (the fixture, on both databases)
from tests.support.poll import eventually
from tests.unit.test_gpu_monitor import FakeGpu, FakeNvml

GiB = 1024**3
RESOLUTION = 60
# A bucket's start, and the recorder's reads just after it.
B = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def exposition(series: dict[tuple[str, str], tuple[int, int, int]]) -> str:
    """A gateway's histograms: (service, code) -> requests under 0.1 s, under 0.5 s, slower."""
    lines = ["# TYPE mmanager_gateway_request_duration_seconds histogram"]
    for (service, code), per_bucket in series.items():
        labels = f'service="{service}",replica="r1",code="{code}"'
        total = 0
        for le, n in zip(("0.1", "0.5", "+Inf"), per_bucket, strict=True):
            total += n
            lines.append(f'mmanager_gateway_request_duration_seconds_bucket{{{labels},le="{le}"}} {total}')
        lines.append(f"mmanager_gateway_request_duration_seconds_sum{{{labels}}} 1.0")
        lines.append(f"mmanager_gateway_request_duration_seconds_count{{{labels}}} {total}")
    return "\n".join([*lines, ""])


class Gateways:
    """What read_gateways answers: each gateway's exposition, and when it registered."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}
        self.created: dict[str, datetime] = {}

    async def read(self, db: Database) -> tuple[list[tuple[Any, Any]], list[str]]:
        return [(SimpleNamespace(id=g, created_at=self.created.get(g, B - timedelta(days=1))), parse(text))
                for g, text in sorted(self.text.items())], []


Round = Callable[[datetime], Awaitable[None]]


def _recording(db: Database, monkeypatch: pytest.MonkeyPatch) -> tuple[Gateways, Round]:
    """Fake gateways whose expositions the test sets, and one of the recorder's rounds over them, read at a
    bucket's start (as the recorder does, its offset after)."""
    gateways = Gateways()
    monkeypatch.setattr(traffic_history, "read_gateways", gateways.read)
    now = B
    settings = HubSettings(database_url=db.url, api_key=KEY, metrics_resolution=RESOLUTION)
    recorder = TrafficRecorder(db, settings, clock=lambda: now)

    async def round_at(at: datetime) -> None:
        nonlocal now
        now = at + timedelta(seconds=recorder.offset)
        await recorder.run_once()

    return gateways, round_at


async def _service(db: Database, owner: str, name: str, desired_state: str = "running") -> str:
    async with db.session() as session:
        user = await session.scalar(select(UserModel).where(UserModel.username == owner))
        if user is None:
            user = UserModel(username=owner)
            session.add(user)
            await session.flush()
        service = ServiceModel(name=name, owner_id=user.id, repo="default", spec={}, desired_state=desired_state)
        session.add(service)
        await session.flush()
        return service.id


def _resources(sid: str, at: datetime, cpu: float, gpu: tuple[int, float] | None = None) -> dict[str, Any]:
    bucket = Bucket()
    health, [container] = _report(cpu, at)
    usage = container.usage
    assert usage is not None
    if gpu is not None:
        usage = usage.model_copy(update={"gpu_memory_bytes": gpu[0], "gpu_util_percent": gpu[1]})
    bucket.add(container.model_copy(update={"usage": usage}))
    return bucket.row(sid, at)


async def _write(db: Database, rows: list[dict[str, Any]]) -> None:
    async with db.session() as session:
        await _upsert_metrics(session, rows)


async def test_recorded_traffic_lands_in_its_buckets_beside_the_samples(
        any_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    sid = await _service(any_db, "alice", "a")
    gateways, round_at = _recording(any_db, monkeypatch)

    # Bucket B's samples are written before its traffic, bucket B+1's after.
    await _write(any_db, [_resources(sid, B, 40.0, gpu=(3 * GiB, 50.0))])
    gateways.text = {"gw1": exposition({("alice/a", "2xx"): (3, 0, 0)}),
                     "gw2": exposition({("alice/a", "2xx"): (1, 0, 0), ("frontend", "4xx"): (9, 0, 0)})}
    await round_at(B)  # the baselines: nothing counted
    gateways.text = {"gw1": exposition({("alice/a", "2xx"): (5, 2, 0), ("alice/a", "5xx"): (0, 0, 1)}),
                     "gw2": exposition({("alice/a", "2xx"): (2, 0, 0), ("frontend", "4xx"): (12, 0, 0)})}
    await round_at(B + timedelta(seconds=60))
    # gw1 restarted (fewer than before: what it holds now counts); gw3 registered since the last round.
    gateways.text = {"gw1": exposition({("alice/a", "2xx"): (1, 0, 0)}),
                     "gw2": exposition({("alice/a", "2xx"): (2, 0, 0), ("frontend", "4xx"): (12, 0, 0)}),
                     "gw3": exposition({("alice/a", "2xx"): (0, 0, 4)})}
    gateways.created["gw3"] = B + timedelta(seconds=90)
    await round_at(B + timedelta(seconds=120))
    await _write(any_db, [_resources(sid, B + timedelta(seconds=60), 20.0)])

    async with any_db.session() as session:
        # A row from before the traffic history: no request count, not zero.
        session.add(ServiceMetricModel(
            service_id=sid, at=B - timedelta(seconds=60), samples=1, cpu_percent_avg=1, cpu_percent_max=1,
            memory_bytes_avg=1, memory_bytes_max=1, memory_percent_max=1, network_rx_bytes=0, network_tx_bytes=0,
            block_read_bytes=0, block_write_bytes=0))
        await session.flush()
        points = await service_history(session, sid, B - timedelta(minutes=5), RESOLUTION)
        merged = await service_history(session, sid, B, 3 * RESOLUTION)

    def shown(p: dict[str, Any]) -> tuple[Any, ...]:
        return (p["at"], p["samples"], p["cpu_percent_avg"], p["requests"], p["errors_5xx"],
                p["gpu_memory_bytes_max"], p["gpu_util_percent_avg"])

    assert [shown(p) for p in points] == [
        (B - timedelta(seconds=60), 1, 1.0, None, None, None, None),
        # gw1: 2 more under 0.1 s, 2 under 0.5 s, one 5xx; gw2: 1 more.
        (B, 1, 40.0, 6, 1, 3 * GiB, 50.0),
        # gw1 from zero again: 1; gw2 nothing new; gw3 new: its 4.
        (B + timedelta(seconds=60), 1, 20.0, 5, 0, None, None),
    ]
    first = points[1]
    assert first["latency_p50_seconds"] == pytest.approx(0.1 * 3 / 3)  # the 3rd of 6 is the last under 0.1 s
    assert 0.1 < first["latency_p95_seconds"] <= 0.5 and first["latency_p99_seconds"] >= first["latency_p95_seconds"]
    assert points[0]["latency_p50_seconds"] is None
    # gw3's 4 slow ones are in the +Inf bucket: the largest finite bound.
    assert points[2]["latency_p99_seconds"] == pytest.approx(0.5)
    [whole] = merged
    assert (whole["samples"], whole["requests"], whole["errors_5xx"], whole["gpu_memory_bytes_max"]) \
        == (2, 11, 1, 3 * GiB)
    assert whole["cpu_percent_avg"] == pytest.approx(30.0)

    # Traffic in a bucket with no sample: a point with no resource values.
    gateways.text["gw3"] = exposition({("alice/a", "2xx"): (0, 1, 4)})
    await round_at(B + timedelta(seconds=180))
    async with any_db.session() as session:
        [late] = await service_history(session, sid, B + timedelta(seconds=120), RESOLUTION)
    assert (late["samples"], late["cpu_percent_avg"], late["network_rx_bytes"], late["requests"]) == (0, None, None, 1)
    assert late["latency_p50_seconds"] == pytest.approx(0.3)

    # A round whose write fails is counted by the next, in the bucket of the last read that was recorded.
    async def refused(*_: Any, **__: Any) -> None:
        raise OSError("the database went away")

    gateways.text["gw3"] = exposition({("alice/a", "2xx"): (0, 1, 5)})
    with monkeypatch.context() as patched:
        patched.setattr(traffic_history, "record", refused)
        with pytest.raises(OSError):
            await round_at(B + timedelta(seconds=240))
    gateways.text["gw3"] = exposition({("alice/a", "2xx"): (0, 1, 6)})
    await round_at(B + timedelta(seconds=300))
    async with any_db.session() as session:
        points = await service_history(session, sid, B + timedelta(seconds=180), RESOLUTION)
    assert [(p["at"], p["requests"]) for p in points] == [(B + timedelta(seconds=180), 2)]


def _gpu_container(runtime: FakeRuntime, service: str, gpus: str | None) -> str:
    labels = {LABEL_MANAGED: "true", LABEL_CONTROLLER: "ctl", LABEL_SERVICE: service}
    if gpus:
        labels[LABEL_GPUS] = gpus
    return runtime.add_container(ContainerSpec(image="mmanager/example-model:latest", labels=labels)).id


async def test_a_gpu_controllers_samples_give_the_buckets_vram_and_utilisation(any_db: Database) -> None:  # noqa: F811
    # The controller: two GPUs behind a fake NVML, a service on both and a CPU service.
    runtime = FakeRuntime("ctl")
    nvml = FakeNvml([FakeGpu(utilization=90), FakeGpu(utilization=30)])
    monitor = GpuMonitor(10.0, nvml=nvml)
    assert monitor.open()
    on_gpu, on_cpu = _gpu_container(runtime, "s-gpu", "0,1"), _gpu_container(runtime, "s-cpu", None)
    pids = {100: on_gpu, 101: on_gpu}
    nvml.gpus[0].processes, nvml.gpus[1].processes = {100: 6 * GiB}, {101: 2 * GiB}  # type: ignore[union-attr]
    sampler = StatsSampler(make_settings("ctl", stats_interval=1), runtime, ControllerMetrics("ctl"),
                           gpus=monitor, locate=pids.get)
    monitor._started = True  # opened above; its loop is not run, its rounds are
    await monitor.run_once()
    await sampler.run_once()  # each container's first reading: its CPU figure comes with the next
    await sampler.run_once()
    assert sampler.usage(on_cpu) is not None and sampler.usage(on_cpu).gpu_memory_bytes is None  # type: ignore[union-attr]

    # The hub: the heartbeat's container samples, as the flusher writes them once the bucket is over.
    settings = HubSettings(database_url=any_db.url, api_key=KEY, metrics_resolution=1)
    hub = Monitor(any_db, settings, HubMetrics())
    health, _ = _report(10.0, datetime.now(UTC))
    start = datetime.now(UTC)
    containers = [HeartbeatContainer(container_id=cid, name=cid, service_id=sid, state="running",
                                     usage=sampler.usage(cid)) for cid, sid in ((on_gpu, "s-gpu"), (on_cpu, "s-cpu"))]
    hub.observe("ctl", health, containers, current={on_gpu, on_cpu})

    def history(sid: str) -> Callable[[], Any]:
        async def read() -> list[dict[str, Any]] | None:
            await hub.flush()
            async with any_db.session() as session:
                return await service_history(session, sid, start - timedelta(seconds=5), 1) or None
        return read

    [gpu] = await eventually(history("s-gpu"), 10, "the GPU service's bucket written", interval=0.2)
    [cpu] = await eventually(history("s-cpu"), 10, "the CPU service's bucket written", interval=0.2)
    assert (gpu["gpu_memory_bytes_max"], gpu["gpu_util_percent_avg"]) == (8 * GiB, 60.0)
    assert (cpu["gpu_memory_bytes_max"], cpu["gpu_util_percent_avg"]) == (None, None)
    # No traffic recorder counted this bucket: its requests are unknown, not 0.
    assert (gpu["requests"], gpu["errors_5xx"], gpu["latency_p50_seconds"]) == (None, None, None)


async def test_a_bucket_counted_without_requests_is_zero_and_one_never_counted_is_null(
        any_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    busy, idle = await _service(any_db, "carol", "busy"), await _service(any_db, "carol", "idle")
    stopped = await _service(any_db, "carol", "stopped", desired_state="stopped")
    gateways, round_at = _recording(any_db, monkeypatch)

    # The heartbeats' samples of both running services, before the recorder ever counted (a new leader's
    # first read is its baseline): bucket B - 60 is never counted.
    await _write(any_db, [_resources(sid, at, 10.0) for sid in (busy, idle) for at in (B - timedelta(seconds=60), B)])
    gateways.text = {"gw1": exposition({("carol/busy", "2xx"): (1, 0, 0)})}
    await round_at(B)
    gateways.text = {"gw1": exposition({("carol/busy", "2xx"): (3, 0, 0)})}
    await round_at(B + timedelta(seconds=60))

    async def shown(sid: str) -> list[tuple[Any, ...]]:
        async with any_db.session() as session:
            points = await service_history(session, sid, B - timedelta(minutes=5), RESOLUTION)
        return [(p["at"], p["samples"], p["requests"], p["errors_5xx"], p["latency_p50_seconds"]) for p in points]

    assert await shown(busy) == [(B - timedelta(seconds=60), 1, None, None, None),
                                 (B, 1, 2, 0, pytest.approx(0.05))]
    assert await shown(idle) == [(B - timedelta(seconds=60), 1, None, None, None), (B, 1, 0, 0, None)]
    assert await shown(stopped) == []

    # A round in which no service had a request counts 0 for both; then, with no gateway answering, the
    # bucket is not counted.
    await round_at(B + timedelta(seconds=120))
    gateways.text = {}
    await round_at(B + timedelta(seconds=180))
    await _write(any_db, [_resources(idle, B + timedelta(seconds=s), 10.0) for s in (60, 120)])
    assert (await shown(busy))[-1] == (B + timedelta(seconds=60), 0, 0, 0, None)
    assert (await shown(idle))[-2:] == [(B + timedelta(seconds=60), 1, 0, 0, None),
                                        (B + timedelta(seconds=120), 1, None, None, None)]


async def test_concurrent_writes_of_one_bucket_add_up(any_db: Database) -> None:  # noqa: F811
    sid = await _service(any_db, "dave", "d")
    one = Traffic(1, 1, {"0.1": 1, "0.5": 1, "+Inf": 1})
    slow = Traffic(2, 0, {"0.1": 0, "0.5": 0, "+Inf": 2})
    writes = [{B: {"dave/d": one}}] * 6 + [{B: {"dave/d": slow}}] * 2
    await asyncio.gather(*(traffic_history.record(any_db, w) for w in writes))
    async with any_db.session() as session:
        row = await session.get(ServiceMetricModel, (sid, B))
        assert row is not None
        assert (row.requests, row.errors_5xx) == (10, 6)
        assert {le: float(n) for le, n in (row.latency_buckets or {}).items()} == {"0.1": 6.0, "0.5": 6.0, "+Inf": 10.0}
