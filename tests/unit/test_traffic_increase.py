"""The traffic history's arithmetic (hub.services.traffic): what a gateway's series counted between two
reads (never negative; a series that went down restarted from zero), summed per service over gateways,
with its latency quantiles from the histogram's counts; the recorder's reads fall just after each bucket
starts; and a GPU container's VRAM and utilisation as the controller's sampler reports them (fake NVML):
unknown (None) where NVML gave no process list, 0 where it listed none, and NVML failing costs only those
fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controller.fake import FakeRuntime
from controller.gpu import LABEL_GPUS
from controller.gpu_monitor import NVML_ERROR_NOT_SUPPORTED, GpuMonitor
from controller.health import ControllerMetrics
from controller.spec import ContainerSpec
from controller.stats import StatsSampler, gpu_use
from hub.background.traffic_history import TrafficRecorder
from hub.config import HubSettings
from hub.services.traffic import Counts, add_histograms, histogram_quantile, increase, parse, per_service, series_of
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED, LABEL_SERVICE, ContainerInfo, GpuUsage
from tests.controller.conftest import make_settings
from tests.unit.test_gpu_monitor import FakeGpu, FakeNvml

BOUNDS = ("0.1", "0.5", "+Inf")


def counts(*per_bucket: int) -> Counts:
    """A series' Counts from its requests per bucket (not cumulative), bounds BOUNDS."""
    cumulative, total = {}, 0
    for le, n in zip(BOUNDS, per_bucket, strict=True):
        total += n
        cumulative[le] = float(total)
    return Counts(float(total), cumulative)


def test_increase_is_the_difference_and_a_new_series_counts_whole() -> None:
    before = {("alice/a", "r1", "2xx"): counts(3, 1, 0)}
    now = {("alice/a", "r1", "2xx"): counts(5, 2, 1), ("alice/a", "r1", "5xx"): counts(0, 0, 2),
           ("alice/b", "r2", "2xx"): counts(0, 0, 0)}
    assert increase(before, now) == {
        ("alice/a", "r1", "2xx"): Counts(4.0, {"0.1": 2.0, "0.5": 3.0, "+Inf": 4.0}),
        ("alice/a", "r1", "5xx"): counts(0, 0, 2),
    }
    # Nothing new: nothing at all (no zero rows to write).
    assert increase(now, now) == {}


@pytest.mark.parametrize("now", [
    counts(1, 0, 0),            # fewer requests: the gateway restarted
    counts(0, 9, 0),            # as many or more, but a bucket went down: it restarted too
    Counts(4.0, {"0.1": 4.0}),  # bounds that went missing
])
def test_a_series_that_went_down_restarted_and_counts_what_it_holds(now: Counts) -> None:
    key = ("alice/a", "r1", "2xx")
    got = increase({key: counts(3, 1, 0)}, {key: now})
    assert got == {key: now}
    assert all(n >= 0 for c in got.values() for n in (c.requests, *c.buckets.values()))


def test_per_service_sums_gateways_and_counts_5xx() -> None:
    one = {("alice/a", "r1", "2xx"): counts(2, 1, 0), ("alice/a", "", "5xx"): counts(1, 0, 0)}
    two = {("alice/a", "r2", "2xx"): counts(0, 3, 1), ("bob/b", "r3", "4xx"): counts(1, 0, 0)}
    got = per_service([one, two])
    assert set(got) == {"alice/a", "bob/b"}
    a = got["alice/a"]
    assert (a.requests, a.errors_5xx, a.buckets) == (8, 1, {"0.1": 3, "0.5": 7, "+Inf": 8})
    assert (got["bob/b"].requests, got["bob/b"].errors_5xx) == (1, 0)


def test_quantiles_from_a_buckets_counts() -> None:
    buckets = add_histograms({"0.1": 5, "0.5": 5, "+Inf": 5}, {"0.1": 0, "0.5": 5, "+Inf": 5})
    as_floats = {float(le): n for le, n in buckets.items()}
    # 10 requests: 5 under 0.1 s, 5 between 0.1 and 0.5.
    assert histogram_quantile(0.5, as_floats) == pytest.approx(0.1)
    assert histogram_quantile(0.99, as_floats) == pytest.approx(0.1 + 0.4 * 4.9 / 5)
    assert histogram_quantile(0.5, {}) is None


def test_series_of_reads_an_exposition() -> None:
    text = "\n".join([
        "# TYPE mmanager_gateway_request_duration_seconds histogram",
        *(f'mmanager_gateway_request_duration_seconds_bucket{{service="alice/a",replica="r1",code="2xx",le="{le}"}} {n}'
          for le, n in (("0.1", 2), ("0.5", 3), ("+Inf", 3))),
        'mmanager_gateway_request_duration_seconds_sum{service="alice/a",replica="r1",code="2xx"} 0.4',
        'mmanager_gateway_request_duration_seconds_count{service="alice/a",replica="r1",code="2xx"} 3',
        "",
    ])
    families = parse(text)
    assert families is not None
    assert series_of(families) == {("alice/a", "r1", "2xx"): Counts(3.0, {"0.1": 2.0, "0.5": 3.0, "+Inf": 3.0})}


@pytest.mark.parametrize(("now", "delay"), [(120.0, 1.0), (120.5, 0.5), (121.0, 60.0), (123.5, 57.5), (179.9, 1.1)])
def test_the_recorder_reads_just_after_each_bucket_starts(now: float, delay: float) -> None:
    settings = HubSettings(database_url="sqlite+aiosqlite://", api_key="k" * 40, metrics_resolution=60)
    recorder = TrafficRecorder(None, settings, clock=lambda: datetime.fromtimestamp(now, UTC))  # type: ignore[arg-type]
    assert recorder.offset == 1.0
    assert recorder.next_delay(0.0) == pytest.approx(delay)


def _info(cid: str, gpus: list[str]) -> ContainerInfo:
    return ContainerInfo(id=cid, container_id=cid, name=f"n-{cid}", image="i", status="running",
                         gpu_device_ids=gpus)


def test_gpu_use_is_the_containers_vram_and_its_gpus_mean_utilisation() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    samples = [GpuUsage(index="0", sampled_at=at, utilization_percent=80.0),
               GpuUsage(index="1", sampled_at=at, utilization_percent=20.0),
               GpuUsage(index="2", sampled_at=at, lost=True)]
    running = [_info("a", ["0", "1"]), _info("b", ["1"]), _info("c", ["2"]), _info("cpu", [])]
    processes = [("0", 100, 3 << 30), ("1", 101, 1 << 30), ("1", 200, 2 << 30), ("0", 999, 5 << 30)]
    pids = {100: "a", 101: "a", 200: "b"}
    assert gpu_use(running, samples, processes, pids.get) == {
        "a": (4 << 30, 50.0), "b": (2 << 30, 20.0), "c": (0, None)}
    # Processes that map to no container at all (no host PID namespace): VRAM unknown, not zero.
    assert gpu_use(running, samples, processes, lambda pid: None)["a"] == (None, 50.0)
    assert gpu_use([_info("cpu", [])], samples, processes, pids.get) == {}
    # A GPU whose process list NVML did not give (failed, unsupported): its containers' VRAM is unknown,
    # where a GPU that listed none has 0; no process list at all: every VRAM unknown.
    assert gpu_use(running, samples, processes, pids.get, unread={"2"}) == {
        "a": (4 << 30, 50.0), "b": (2 << 30, 20.0), "c": (None, None)}
    assert gpu_use(running, samples, [], pids.get, unread={"1"}) == {
        "a": (None, 50.0), "b": (None, 20.0), "c": (0, None)}
    assert {cid: vram for cid, (vram, _) in gpu_use(running, samples, None, pids.get).items()} == dict.fromkeys("abc")


def _gpu_container(runtime: FakeRuntime, gpus: str | None) -> str:
    labels = {LABEL_MANAGED: "true", LABEL_CONTROLLER: "ctl", LABEL_SERVICE: "s"}
    if gpus:
        labels[LABEL_GPUS] = gpus
    return runtime.add_container(ContainerSpec(image="mmanager/example-model:latest", labels=labels)).id


async def test_the_sampler_tells_unknown_vram_from_none_and_nvml_failing_costs_only_the_gpu_fields(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = FakeRuntime("ctl")
    nvml = FakeNvml([FakeGpu(utilization=40), FakeGpu(utilization=60, errors={"processes": NVML_ERROR_NOT_SUPPORTED})])
    monitor = GpuMonitor(10.0, nvml=nvml)
    assert monitor.open()
    monitor._started = True  # opened above; its loop is not run, its rounds are
    await monitor.run_once()
    listed, unsupported, cpu = _gpu_container(runtime, "0"), _gpu_container(runtime, "1"), _gpu_container(runtime, None)
    sampler = StatsSampler(make_settings("ctl", stats_interval=1), runtime, ControllerMetrics("ctl"), gpus=monitor,
                           locate=lambda pid: None)

    def shown(cid: str) -> tuple[Any, ...]:
        usage = sampler.usage(cid)
        assert usage is not None
        return usage.sampled_at, usage.gpu_memory_bytes, usage.gpu_util_percent

    await sampler.run_once()  # each container's first reading: its CPU figure comes with the next
    await sampler.run_once()
    first = {cid: shown(cid) for cid in (listed, unsupported, cpu)}
    # GPU 0 listed no process: 0 bytes; GPU 1's list is unsupported: unknown.
    assert [v[1:] for v in first.values()] == [(0, 40.0), (None, 60.0), (None, None)]

    def broken() -> Any:
        raise RuntimeError("NVML went away")

    monkeypatch.setattr(monitor, "process_reads", broken)
    monkeypatch.setattr(monitor, "process_memory", broken)
    await sampler.run_once()
    # The round's samples are all there, newer; only the VRAM is unknown.
    for cid, (sampled_at, _, utilization) in first.items():
        at, vram, util = shown(cid)
        assert at > sampled_at and vram is None and util == utilization

