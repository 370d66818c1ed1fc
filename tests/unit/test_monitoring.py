"""The threshold logic of container monitoring, with no server running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hub.config import HubSettings
from hub.metrics import ALERT_KINDS, HubMetrics
from hub.services.monitoring import Monitor, Reading, Thresholds, bucket_start, hysteresis, judge, readings_of
from mmanager.wire import (
    ContainerUsage,
    ControllerHealth,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    HeartbeatContainer,
)

LIMITS = Thresholds(cpu=80, memory=90, disk=85)
ALL = {("cpu", "c1"), ("memory", "c1"), ("disk", "c1")}


def cpu(value: float, container: str = "k1") -> Reading:
    return Reading(("cpu", "c1", container), value, "svc", "name")


def test_a_reading_at_or_over_its_threshold_opens_one_alert_and_no_duplicate_while_it_stays() -> None:
    assert judge(set(), [cpu(79.9)], LIMITS, ALL).opened == []
    assert judge(set(), [cpu(80)], LIMITS, ALL).opened == [cpu(80)]
    stays = judge({cpu(0).key}, [cpu(120)], LIMITS, ALL)
    assert stays.opened == [] and stays.resolved == []


def test_an_alert_resolves_only_below_the_threshold_minus_the_hysteresis() -> None:
    key = cpu(0).key
    assert hysteresis(80) == 5 and hysteresis(20) == 2
    assert judge({key}, [cpu(75)], LIMITS, ALL).resolved == []
    assert judge({key}, [cpu(74.9)], LIMITS, ALL).resolved == [key]


def test_a_container_that_stopped_or_went_resolves_its_alerts_only_where_the_report_covers_it() -> None:
    gone, disk = cpu(0, "gone").key, ("disk", "c1", None)
    other = ("cpu", "c2", "k9")
    result = judge({gone, disk, other}, [cpu(10)], LIMITS, {("cpu", "c1"), ("memory", "c1")})
    # c1's containers were all listed (the gone one was not); its disk and c2 were not reported on.
    assert result.resolved == [gone]


def test_kinds_are_judged_against_their_own_thresholds() -> None:
    readings = [Reading(("memory", "c1", "k1"), 89.0), Reading(("disk", "c1", None), 85.0)]
    assert [r.kind for r in judge(set(), readings, LIMITS, ALL).opened] == ["disk"]


def _health(*, docker: bool = True, disk: float | None = 50.0) -> ControllerHealth:
    return ControllerHealth(
        status="healthy" if docker else "unhealthy", server_id="c1", server_type="cpu", version="1", docker=docker,
        containers=HealthContainers(running=1, max_allowed=10), load_percentage=10, memory_usage_percent=10,
        resources=HealthResources(cpu_cores=1, memory_total_gb=1, memory_available_gb=1),
        capabilities=HealthCapabilities(gpu_support=False, max_memory_gb=1), disk_usage_percent=disk,
    )


def test_readings_come_from_running_containers_with_a_sample_and_the_disk() -> None:
    usage = ContainerUsage(sampled_at=datetime.now(UTC), cpu_percent=95, memory_percent=20)
    containers = [
        HeartbeatContainer(container_id="k1", name="a", service_id="s1", state="running", usage=usage),
        HeartbeatContainer(container_id="k2", name="b", state="exited", usage=usage),
        HeartbeatContainer(container_id="k3", name="c", state="running"),
    ]
    readings, covered = readings_of("c1", _health(), containers)
    assert {(r.key, r.value) for r in readings} == {
        (("cpu", "c1", "k1"), 95), (("memory", "c1", "k1"), 20), (("disk", "c1", None), 50.0)}
    assert covered == ALL
    # Docker down: nothing about containers can be judged (no alert resolves for want of a listing).
    readings, covered = readings_of("c1", _health(docker=False, disk=None), containers)
    assert readings == [] and covered == set()


def test_buckets_align_on_the_resolution() -> None:
    at = datetime(2026, 1, 1, 12, 34, 56, 789, tzinfo=UTC)
    assert bucket_start(at, 60) == datetime(2026, 1, 1, 12, 34, tzinfo=UTC)
    assert bucket_start(at, 300) == datetime(2026, 1, 1, 12, 30, tzinfo=UTC)


def _alerts_active(metrics: HubMetrics) -> dict[str, float]:
    return {kind: metrics.registry.get_sample_value("mmanager_alerts_active", {"kind": kind}) for kind in ALERT_KINDS}


def test_a_report_opens_and_resolves_its_own_controllers_alerts_and_leaves_the_others() -> None:
    """Judged against its own controller's open alerts only (judging each beat against every open alert cost
    0.4 ms a beat at 1,000 open alerts, bench.monitor_observe), with the same outcome."""
    metrics = HubMetrics()
    monitor = Monitor(None, HubSettings(api_key="k" * 32, alert_disk_percent=85, _env_file=None), metrics)
    # As stored: c2's and c3's disks are over; c1 has none open.
    monitor._reloaded({("disk", "c2", None): Reading(("disk", "c2", None), 90.0),
                       ("disk", "c3", None): Reading(("disk", "c3", None), 95.0)})
    assert _alerts_active(metrics) == {"cpu": 0, "memory": 0, "disk": 2}
    monitor.observe("c1", _health(disk=99.0), [], set())
    assert _alerts_active(metrics)["disk"] == 3
    monitor.observe("c2", _health(disk=40.0), [], set())  # resolves c2's, and no other
    assert _alerts_active(metrics)["disk"] == 2
    assert set(monitor._to_resolve) == {("disk", "c2", None)}
    assert set(monitor._to_open) == {("disk", "c1", None)}
    monitor.observe("c1", _health(disk=99.0), [], set())  # still over: nothing new
    monitor.observe("c3", _health(disk=96.0), [], set())
    assert _alerts_active(metrics)["disk"] == 2 and set(monitor._to_open) == {("disk", "c1", None)}


def test_the_monitor_benchmark_measures_a_report_that_changes_nothing() -> None:
    """bench.monitor_observe's own code, briefly (it checks that the report opened, resolved and dropped no alert)."""
    from bench.monitor_observe import measure

    run = measure(1000, calls=20, repeats=1)
    assert run["open_alerts"] == 1000 and run["us_per_observe"] > 0


def test_a_containers_series_follow_each_new_sample_and_a_repeated_one_changes_nothing() -> None:
    metrics = HubMetrics()
    monitor = Monitor(None, HubSettings(api_key="k" * 32, _env_file=None), metrics)
    first = datetime(2026, 1, 1, tzinfo=UTC)

    def report(sampled_at: datetime, cpu: float) -> list[HeartbeatContainer]:
        usage = ContainerUsage(sampled_at=sampled_at, cpu_percent=cpu, memory_percent=5)
        return [HeartbeatContainer(container_id="k1", name="a", service_id="s1", state="running", usage=usage)]

    def cpu_series() -> float | None:
        return metrics.containers.get(("c1", "s1", "a"), "cpu_percent")

    monitor.observe("c1", _health(), report(first, 20), {"k1"})
    monitor.observe("c1", _health(), report(first, 20), {"k1"})  # the controller's next beat, same sample
    assert cpu_series() == 20
    monitor.observe("c1", _health(), report(first + timedelta(seconds=10), 70), {"k1"})
    assert cpu_series() == 70
    monitor.observe("c1", _health(), [], {"k1"})  # gone: its series with it
    assert cpu_series() is None
    monitor.observe("c1", _health(), report(first + timedelta(seconds=10), 70), {"k1"})  # back, same sample
    assert cpu_series() == 70
