"""What ``/health`` and ``/metrics`` report: capacity, usage and whether Docker answers.

Host memory comes from psutil (what is free right now); CPU count and total
memory from the daemon, which is what containers can actually get.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from controller.config import ControllerSettings
from controller.errors import ControllerError, DockerUnavailable
from controller.gpu import gpus_in_use
from controller.runtime import Runtime
from mmanager import __version__
from mmanager.wire import (
    GPU_LABELS,
    GPU_METRICS,
    USAGE_LABELS,
    USAGE_METRICS,
    ContainerUsage,
    ControllerHealth,
    GpuInfo,
    GpuUsage,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    gpu_values,
)

GB = 1024**3


def disk_usage_percent(root_dir: str) -> float:
    """How full the file system of Docker's data root is (``/`` where that is not visible here,
    e.g. a controller in a container, whose own root is on that disk too), as ``df`` counts it."""
    path = root_dir if root_dir and os.path.isdir(root_dir) else "/"
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        usage = shutil.disk_usage("/")
    in_use = usage.used + usage.free
    return round(100 * usage.used / in_use, 2) if in_use else 0.0


def _common(settings: ControllerSettings, memory_percent: float) -> dict[str, Any]:
    return {
        "server_id": settings.server_id,
        "server_type": settings.server_type,
        "version": __version__,
        "memory_usage_percent": memory_percent,
    }


def docker_down_health(settings: ControllerSettings, error: str) -> ControllerHealth:
    """What ``/health`` says when Docker cannot be used: unhealthy, no capacity."""
    return ControllerHealth(
        status="unhealthy",
        docker=False,
        containers=HealthContainers(running=0, max_allowed=settings.max_containers, managed=0),
        resources=HealthResources(cpu_cores=0, memory_total_gb=0, memory_available_gb=0),
        load_percentage=0,
        capabilities=HealthCapabilities(gpu_support=False, max_memory_gb=0, gpus=[], golden_probes=True),
        error=error,
        **_common(settings, psutil.virtual_memory().percent),
    )


async def collect_health(settings: ControllerSettings, runtime: Runtime, gpus: list[GpuInfo]) -> ControllerHealth:
    memory = psutil.virtual_memory()
    common = _common(settings, memory.percent)
    try:
        if not await runtime.ping():
            raise DockerUnavailable("the Docker daemon did not answer a ping")
        host = await runtime.host_info()
        managed = await runtime.list_containers(all=True, detailed=False)
    except ControllerError as exc:
        return docker_down_health(settings, exc.message)
    running = sum(c.status == "running" for c in managed)
    busy = gpus_in_use(managed)
    memory_total_gb = round(host.memory_total / GB, 2)
    disk = await asyncio.to_thread(disk_usage_percent, host.root_dir)
    return ControllerHealth(
        status="healthy",
        docker=True,
        containers=HealthContainers(running=running, max_allowed=settings.max_containers, managed=len(managed)),
        resources=HealthResources(
            cpu_cores=host.cpu_cores,
            memory_total_gb=memory_total_gb,
            memory_available_gb=round(memory.available / GB, 2),
        ),
        load_percentage=round(100 * running / settings.max_containers, 2),
        capabilities=HealthCapabilities(
            gpu_support=bool(gpus),
            max_memory_gb=memory_total_gb,
            gpus=[gpu.model_copy(update={"in_use": gpu.index in busy}) for gpu in gpus],
            golden_probes=True,
        ),
        disk_usage_percent=disk,
        **common,
    )


class ControllerMetrics:
    """The seed's gauges, labelled by controller, in a registry of this app's own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.registry = CollectorRegistry()
        labels = ["controller"]
        self._running = Gauge(
            "mmanager_containers_running", "Managed containers running", labels, registry=self.registry
        ).labels(server_id)
        self._load = Gauge(
            "mmanager_load_percentage",
            "Running managed containers as a percentage of MAX_CONTAINERS",
            labels,
            registry=self.registry,
        ).labels(server_id)
        self._memory = Gauge(
            "mmanager_memory_usage_percent", "Host memory in use, percent", labels, registry=self.registry
        ).labels(server_id)
        self._docker = Gauge(
            "mmanager_docker_up", "1 when the Docker daemon answers", labels, registry=self.registry
        ).labels(server_id)
        self._heartbeat_failures = Counter(
            "mmanager_heartbeat_failures",
            "Heartbeats no hub accepted (unreachable, refused or a bad answer)",
            labels,
            registry=self.registry,
        ).labels(server_id)
        self._disk = Gauge(
            "mmanager_disk_usage_percent", "Disk in use where Docker keeps its data, percent", labels,
            registry=self.registry,
        )
        self._usage = {
            field: Gauge(name, text, USAGE_LABELS, registry=self.registry)
            for field, (name, text) in USAGE_METRICS.items()
        }
        # The label values of each container's series, by container id, to remove them when it goes.
        self._series: dict[str, tuple[str, str, str]] = {}
        self._gpu = [Gauge(name, text, GPU_LABELS, registry=self.registry) for name, text in GPU_METRICS.values()]
        self._gpu_memory_restarts = Counter(
            "mmanager_gpu_memory_restarts", "Containers restarted for using more VRAM than their gpu_memory budget",
            ["controller", "service"], registry=self.registry)

    def gpu_memory_restarted(self, service_id: str) -> None:
        self._gpu_memory_restarts.labels(self.server_id, service_id).inc()

    def heartbeat_failed(self) -> None:
        self._heartbeat_failures.inc()

    def set_usage(self, samples: dict[str, tuple[str, str, ContainerUsage]]) -> None:
        """The latest sample of each running container (id -> (service, name, usage)); others' series go."""
        series = {cid: (self.server_id, service, name) for cid, (service, name, _) in samples.items()}
        for labels in set(self._series.values()) - set(series.values()):
            for gauge in self._usage.values():
                gauge.remove(*labels)
        for cid, (_, _, usage) in samples.items():
            for field, gauge in self._usage.items():
                gauge.labels(*series[cid]).set(getattr(usage, field))
        self._series = series

    def set_gpus(self, samples: list[GpuUsage]) -> None:
        """Each GPU's latest sample (controller.gpu_monitor); a value NVML could not read has no series."""
        for sample in samples:
            labels = (self.server_id, sample.index)
            for gauge, value in zip(self._gpu, gpu_values(sample), strict=True):
                if value is None:
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)
                else:
                    gauge.labels(*labels).set(value)

    def render(self, health: ControllerHealth) -> bytes:
        self._running.set(health.containers.running)
        self._load.set(health.load_percentage)
        self._memory.set(health.memory_usage_percent)
        self._docker.set(1 if health.docker else 0)
        if health.disk_usage_percent is not None:
            self._disk.labels(self.server_id).set(health.disk_usage_percent)
        return generate_latest(self.registry)
