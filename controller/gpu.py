"""GPU inventory and placement on this host.

The inventory is ``GPU_DEVICES`` when set, else what NVML reports, else
nothing. A GPU is taken while a live managed container carries its index in
the ``mmanager.gpus`` label: the label, not controller memory, is the record,
so a restarted controller sees the same allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from controller.errors import GpuUnavailable, InvalidRequest
from mmanager.wire import ContainerInfo, GpuInfo

LABEL_GPUS = "mmanager.gpus"
# Containers in these states hold their GPUs; "created" counts so that a
# container between create and start keeps what it was given.
_HOLDING_STATES = frozenset({"created", "running", "restarting", "paused"})

log = logging.getLogger(__name__)


def detect_gpus(override: list[GpuInfo] | None) -> list[GpuInfo]:
    if override is not None:
        return list(override)
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no NVIDIA GPUs detected (%s)", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=str(index),
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    memory_mb=int(memory.total) // (1024 * 1024),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def label_gpu_ids(labels: dict[str, str]) -> list[str]:
    return [index for index in labels.get(LABEL_GPUS, "").split(",") if index]


def gpus_in_use(containers: Iterable[ContainerInfo]) -> set[str]:
    return {index for c in containers if c.status in _HOLDING_STATES for index in c.gpu_device_ids}


def choose_gpus(inventory: list[GpuInfo], in_use: set[str], count: int, requested: list[str] | None) -> list[str]:
    """The GPU indexes a new container gets: the requested ones, or ``count`` free ones, lowest first."""
    known = [gpu.index for gpu in inventory]
    free = [index for index in known if index not in in_use]
    if requested:
        unknown = [index for index in requested if index not in known]
        if unknown:
            raise InvalidRequest(f"unknown GPU ids {unknown}; this controller has {known}", {"gpus": known})
        if count and count != len(requested):
            raise InvalidRequest("gpu_count and gpu_device_ids disagree")
        busy = [index for index in requested if index in in_use]
        if busy:
            raise GpuUnavailable(f"GPUs {busy} are in use", {"free": free})
        return list(dict.fromkeys(requested))
    if count > len(free):
        raise GpuUnavailable(
            f"{count} GPU(s) requested, {len(free)} of {len(known)} free", {"free": free, "total": len(known)}
        )
    return free[:count]
