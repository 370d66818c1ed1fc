"""GPU inventory and placement on this host.

The inventory is ``GPU_DEVICES`` when set, else what NVML reports, else
nothing. A GPU is taken while a live managed container carries its index in
the ``mmanager.gpus`` label: the label, not controller memory, is the record,
so a restarted controller sees the same allocation. A container that also
carries ``mmanager.gpu_memory`` (bytes) shares its one GPU under that budget:
a GPU is held whole or shared, never both, and its shares never sum above its
VRAM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from controller.errors import GpuUnavailable, InvalidRequest
from mmanager.wire import ContainerInfo, GpuInfo

LABEL_GPUS = "mmanager.gpus"
LABEL_GPU_MEMORY = "mmanager.gpu_memory"
# What a shared-GPU container finds in its environment: its budget, and the MPS limit for its one device.
ENV_GPU_MEMORY = "MMANAGER_GPU_MEMORY_BYTES"
ENV_MPS_LIMIT = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
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


def _share(c: ContainerInfo) -> int:
    try:
        return int(c.labels.get(LABEL_GPU_MEMORY) or 0)
    except ValueError:
        return 0


def gpu_shares(containers: Iterable[ContainerInfo]) -> tuple[set[str], dict[str, int]]:
    """The GPUs held whole, and the VRAM budget committed on each shared one, by live managed containers."""
    whole: set[str] = set()
    shared: dict[str, int] = {}
    for c in containers:
        if c.status not in _HOLDING_STATES:
            continue
        budget = _share(c)
        for index in c.gpu_device_ids:
            if budget:
                shared[index] = shared.get(index, 0) + budget
            else:
                whole.add(index)
    return whole, shared


def choose_shared_gpu(inventory: list[GpuInfo], whole: set[str], shared: dict[str, int], budget: int,
                      requested: list[str] | None) -> str:
    """The GPU a shared container gets: the requested one (the hub's choice) if its budget still fits there,
    else the best fit (the least VRAM left after it). The hub's view may lag: this is the last word."""
    known = {gpu.index: gpu.memory_mb * 1024 * 1024 for gpu in inventory}
    if requested and len(requested) > 1:
        raise InvalidRequest("a shared GPU ask names one GPU", {"gpu_device_ids": requested})

    def left(index: str) -> int:
        return known[index] - shared.get(index, 0) - budget

    if requested:
        index = requested[0]
        if index not in known:
            raise InvalidRequest(f"unknown GPU id {index!r}; this controller has {sorted(known)}", {"gpus": sorted(known)})
        if index in whole:
            raise GpuUnavailable(f"GPU {index} is held whole", {"gpu": index})
        if left(index) < 0:
            raise GpuUnavailable(
                f"GPU {index} has {max(known[index] - shared.get(index, 0), 0)} bytes of VRAM budget left, "
                f"{budget} asked", {"gpu": index, "committed": shared.get(index, 0), "total": known[index]})
        return index
    fits = sorted((left(i), i) for i in known if i not in whole and left(i) >= 0)
    if not fits:
        raise GpuUnavailable(f"no shared GPU has {budget} bytes of VRAM budget left", {"budget": budget})
    return fits[0][1]


def share_environment(budget: int) -> dict[str, str]:
    """The environment of a container with ``budget`` bytes of its one GPU (seen inside as device 0)."""
    return {ENV_GPU_MEMORY: str(budget), ENV_MPS_LIMIT: f"0={max(budget // (1024 * 1024), 1)}M"}
