"""controller.gpu_monitor with a fake NVML (a pynvml-like module object): each GPU's utilisation, memory,
temperature and power; a read NVML refuses on one GPU leaves the others whole; a GPU lost or gone shows as
lost; no NVML means no samples, no series, no heartbeat field and one log line at most."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller import gpu_monitor
from controller.gpu_monitor import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NOT_SUPPORTED,
    GpuMonitor,
    with_gpu_usage,
)
from controller.health import ControllerMetrics
from mmanager.wire import (
    ControllerHealth,
    GpuUsage,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    Heartbeat,
)

GiB = 1024**3
NVML_ERROR_UNKNOWN = 999
NVML_ERROR_INVALID_ARGUMENT = 2


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NVML_ERROR_GPU_IS_LOST: "GPU is lost", NVML_ERROR_NOT_SUPPORTED: "Not Supported",
                NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument"}.get(self.value, "Unknown Error")


@dataclass
class FakeGpu:
    utilization: int = 0
    used: int = 0
    total: int = 80 * GiB
    temperature: int = 40
    milliwatts: int = 100_000
    # NVML error code per call name ("utilization", "memory", "temperature", "power", "handle", "processes").
    errors: dict[str, int] = field(default_factory=dict)
    # Its compute processes: host pid -> VRAM bytes used (None: NVML does not give it, no permission).
    processes: dict[int, int | None] = field(default_factory=dict)


class FakeNvml:
    """What controller.gpu_monitor calls of pynvml, over a list of FakeGpu (None: the GPU is gone)."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu | None], *, init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.inits = self.shutdowns = self.process_reads = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        gpu = self.gpus[handle]
        if gpu is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if call in gpu.errors:
            raise NVMLError(gpu.errors[call])
        return gpu

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._gpu(index, "handle")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self._gpu(handle, "utilization").utilization, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        gpu = self._gpu(handle, "memory")
        return SimpleNamespace(used=gpu.used, total=gpu.total, free=gpu.total - gpu.used)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == 0
        return self._gpu(handle, "temperature").temperature

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "power").milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self.process_reads += 1
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self._gpu(handle, "processes").processes.items()]


def opened(nvml: FakeNvml, metrics: ControllerMetrics | None = None) -> GpuMonitor:
    monitor = GpuMonitor(10.0, metrics, nvml=nvml)
    assert monitor.open()
    return monitor


def gauges(metrics: ControllerMetrics) -> dict[tuple[str, str], float]:
    text = metrics.render(health()).decode()
    return {(s.name, s.labels["gpu"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("mmanager_gpu_")}


def health() -> ControllerHealth:
    return ControllerHealth(
        status="healthy", server_id="ctl", server_type="gpu", version="t", docker=True,
        containers=HealthContainers(running=0, max_allowed=10), load_percentage=0, memory_usage_percent=10,
        resources=HealthResources(cpu_cores=8, memory_total_gb=64, memory_available_gb=32),
        capabilities=HealthCapabilities(gpu_support=True, max_memory_gb=64),
    )


def test_each_gpu_is_sampled_utilisation_memory_temperature_and_power() -> None:
    nvml = FakeNvml([FakeGpu(utilization=87, used=30 * GiB, temperature=64, milliwatts=251_500),
                     FakeGpu(utilization=3, used=GiB, total=24 * GiB, temperature=35, milliwatts=20_000)])
    metrics = ControllerMetrics("ctl")
    monitor = opened(nvml, metrics)
    first, second = monitor.sample()
    assert first.model_dump(exclude={"sampled_at"}) == {
        "index": "0", "lost": False, "utilization_percent": 87.0, "memory_used_bytes": 30 * GiB,
        "memory_total_bytes": 80 * GiB, "temperature_celsius": 64.0, "power_watts": 251.5}
    assert (second.index, second.memory_total_bytes, second.power_watts) == ("1", 24 * GiB, 20.0)
    assert first.sampled_at.tzinfo is not None

    metrics.set_gpus([first, second])
    seen = gauges(metrics)
    assert seen[("mmanager_gpu_utilization_percent", "0")] == 87.0
    assert seen[("mmanager_gpu_memory_used_bytes", "0")] == 30 * GiB
    assert seen[("mmanager_gpu_memory_total_bytes", "1")] == 24 * GiB
    assert seen[("mmanager_gpu_temperature_celsius", "1")] == 35.0
    assert seen[("mmanager_gpu_power_watts", "0")] == 251.5
    assert seen[("mmanager_gpu_lost", "0")] == seen[("mmanager_gpu_lost", "1")] == 0.0


async def test_run_once_samples_off_the_event_loop_and_sets_the_gauges() -> None:
    metrics = ControllerMetrics("ctl")
    monitor = opened(FakeNvml([FakeGpu(utilization=50)]), metrics)
    await monitor.run_once()
    assert [g.utilization_percent for g in monitor.latest] == [50.0]
    assert gauges(metrics)[("mmanager_gpu_utilization_percent", "0")] == 50.0


def test_an_nvml_error_on_one_gpu_leaves_the_others_whole_and_shows(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu(utilization=10, errors={"temperature": NVML_ERROR_UNKNOWN}),
                     # No power sensor: not an error, just no value.
                     FakeGpu(utilization=20, errors={"power": NVML_ERROR_NOT_SUPPORTED}),
                     FakeGpu(utilization=30)])
    metrics = ControllerMetrics("ctl")
    monitor = opened(nvml, metrics)
    with caplog.at_level(logging.INFO, logger="controller.gpu_monitor"):
        failing, unsupported, fine = monitor.sample()
        monitor.sample()
    assert failing.error == "Unknown Error" and not failing.lost
    assert failing.temperature_celsius is None and failing.utilization_percent == 10.0
    assert failing.power_watts == 100.0
    assert unsupported.error is None and unsupported.power_watts is None and unsupported.utilization_percent == 20.0
    assert fine.error is None and fine.utilization_percent == 30.0 and fine.temperature_celsius == 40.0
    # Logged when it started failing, not on every round.
    assert [r.getMessage() for r in caplog.records] == ["GPU 0: NVML read failed: Unknown Error"]

    metrics.set_gpus([failing, unsupported, fine])
    seen = gauges(metrics)
    assert ("mmanager_gpu_temperature_celsius", "0") not in seen
    assert ("mmanager_gpu_power_watts", "1") not in seen
    assert seen[("mmanager_gpu_utilization_percent", "0")] == 10.0
    assert seen[("mmanager_gpu_temperature_celsius", "2")] == 40.0

    # It reads again: the series comes back, and the recovery is logged once.
    nvml.gpus[0].errors.clear()  # type: ignore[union-attr]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="controller.gpu_monitor"):
        metrics.set_gpus(monitor.sample())
    assert gauges(metrics)[("mmanager_gpu_temperature_celsius", "0")] == 40.0
    assert [r.getMessage() for r in caplog.records] == ["GPU 0 answers NVML again"]


def test_a_lost_gpu_and_a_gpu_gone_from_the_bus_show_as_lost(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu(utilization=10), FakeGpu(utilization=20), FakeGpu(utilization=30)])
    metrics = ControllerMetrics("ctl")
    monitor = opened(nvml, metrics)
    metrics.set_gpus(monitor.sample())
    assert gauges(metrics)[("mmanager_gpu_utilization_percent", "1")] == 20.0

    nvml.gpus[1].errors["utilization"] = NVML_ERROR_GPU_IS_LOST  # type: ignore[union-attr]
    nvml.gpus[2] = None
    with caplog.at_level(logging.WARNING, logger="controller.gpu_monitor"):
        samples = monitor.sample()
        monitor.sample()
    ok, lost, gone = samples
    assert not ok.lost and ok.utilization_percent == 10.0
    assert lost.lost and lost.error == "GPU is lost" and lost.utilization_percent is None
    assert gone.lost and gone.memory_total_bytes is None
    assert sorted(r.getMessage() for r in caplog.records) == [
        "GPU 1 lost: NVML no longer answers for it (GPU is lost)",
        "GPU 2 lost: NVML no longer answers for it (Invalid Argument)",
    ]
    metrics.set_gpus(samples)
    seen = gauges(metrics)
    assert seen[("mmanager_gpu_lost", "1")] == seen[("mmanager_gpu_lost", "2")] == 1.0
    assert seen[("mmanager_gpu_lost", "0")] == 0.0
    assert ("mmanager_gpu_utilization_percent", "1") not in seen
    assert ("mmanager_gpu_memory_total_bytes", "2") not in seen

    # The count shrank under it (a GPU removed): still counted, still lost.
    del nvml.gpus[2]
    assert monitor.sample()[2].lost


async def test_without_nvml_nothing_is_sampled_nothing_breaks_and_nothing_is_logged_per_tick(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # pynvml not installed.
    monkeypatch.setattr(gpu_monitor, "load_nvml", lambda: None)
    metrics = ControllerMetrics("ctl")
    monitor = GpuMonitor(0.01, metrics)
    monitor.start()
    assert monitor.latest == [] and not monitor.running()
    await monitor.stop()

    # Installed, but no driver (NVML_ERROR_LIBRARY_NOT_FOUND): one line at start, then nothing.
    nvml = FakeNvml([], init_error=12)
    with caplog.at_level(logging.DEBUG, logger="controller.gpu_monitor"):
        monitor = GpuMonitor(0.01, metrics, nvml=nvml)
        monitor.start()
        assert not monitor.running()
        await monitor.stop()
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO

    # A driver and no GPU: NVML is shut down again, nothing runs.
    nvml = FakeNvml([])
    monitor = GpuMonitor(0.01, metrics, nvml=nvml)
    monitor.start()
    assert not monitor.running() and (nvml.inits, nvml.shutdowns) == (1, 1)
    await monitor.stop()
    assert nvml.shutdowns == 1

    # No samples: no GPU series, and the health (so the heartbeat) carries no gpu_usage at all.
    assert b"mmanager_gpu_lost{" not in metrics.render(health())
    assert with_gpu_usage(health(), monitor) == health()
    beat = Heartbeat(server_id="ctl", health=with_gpu_usage(health(), None))
    assert "gpu_usage" not in beat.model_dump_json()


async def test_the_loop_starts_with_gpus_and_shuts_nvml_down_on_stop() -> None:
    nvml = FakeNvml([FakeGpu(utilization=5)])
    monitor = GpuMonitor(0.01, None, nvml=nvml)
    monitor.start()
    assert monitor.running()
    await monitor.stop()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_samples_ride_in_the_health_and_round_trip_through_the_heartbeat() -> None:
    monitor = opened(FakeNvml([FakeGpu(utilization=70, used=GiB)]))
    monitor.latest = monitor.sample()
    carried = with_gpu_usage(health(), monitor)
    assert [g.utilization_percent for g in carried.gpu_usage] == [70.0]
    beat = Heartbeat.model_validate_json(Heartbeat(server_id="ctl", health=carried).model_dump_json())
    assert beat.health.gpu_usage == monitor.latest
    # A sample the controller could not read in full is still a valid one.
    GpuUsage(index="3", sampled_at=datetime.now(UTC), lost=True, error="GPU is lost")
