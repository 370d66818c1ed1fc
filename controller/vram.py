"""The per-container VRAM watch: a container that shares a GPU under a budget (``mmanager.gpu_memory``)
and uses more is restarted in place, audited and counted.

Each ``MMANAGER_STATS_INTERVAL`` seconds, on a host where NVML answers, the GPU processes NVML reports
(``nvmlDeviceGetComputeRunningProcesses``: pid and VRAM used) are mapped to containers by the container
id in ``/proc/<pid>/cgroup`` (so the controller needs the host's PID namespace: NVML reports host pids)
and summed per container. Invariant: a container is restarted only after ``MMANAGER_GPU_MEMORY_STRIKES``
consecutive samples over its budget (one sample may catch a transient peak, a framework's workspace
allocated and freed at once), at most once per such run of samples; each restart is an audit event
(shipped to the hub with the next heartbeat) and counts in ``mmanager_gpu_memory_restarts_total``.
Where an MPS daemon runs, ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (set at create) stops the allocation
first; this watch is the backstop where it does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.audit import AuditTrail
from controller.errors import ControllerError, NotFound
from controller.gpu import LABEL_GPU_MEMORY
from controller.gpu_monitor import GpuMonitor
from controller.health import ControllerMetrics
from controller.runtime import Runtime
from mmanager.loops import LoopService
from mmanager.wire import AuditEvent, ContainerInfo

log = logging.getLogger(__name__)

# A Docker container id, as it appears in a cgroup path (".../docker-<id>.scope", "/docker/<id>").
_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
RESTART_TIMEOUT = 10


def container_of(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The id of the Docker container a process runs in (the innermost named in its cgroups), or None."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        for match in _CONTAINER_ID.finditer(line):
            found = match.group(1)
    return found


def budget_of(info: ContainerInfo) -> int:
    try:
        return int(info.labels.get(LABEL_GPU_MEMORY) or 0)
    except ValueError:
        return 0


def per_container(processes: list[tuple[str, int, int]], wanted: set[str],
                  locate: Callable[[int], str | None]) -> dict[str, int]:
    """VRAM used by each of the ``wanted`` containers: the processes (gpu, pid, bytes) summed by container."""
    used: dict[str, int] = {}
    for _, pid, size in processes:
        cid = locate(pid)
        if cid is not None and cid in wanted:
            used[cid] = used.get(cid, 0) + size
    return used


class VramWatch(LoopService):
    name = "vram-watch"
    cancel_on_stop = True

    def __init__(self, interval: float, runtime: Runtime, heal: Callable[[str, int], Any], monitor: GpuMonitor, *,
                 strikes: int = 2, audit: AuditTrail | None = None, metrics: ControllerMetrics | None = None,
                 locate: Callable[[int], str | None] = container_of) -> None:
        super().__init__(interval, jitter=0.0)
        self.runtime = runtime
        self.heal = heal
        self.monitor = monitor
        self.strikes = strikes
        self.audit = audit
        self.metrics = metrics
        self.locate = locate
        # Container id -> consecutive samples over its budget.
        self.over: dict[str, int] = {}

    def start(self) -> None:
        if self.interval > 0 and self.strikes > 0 and self.monitor.started:
            log.info("VRAM watch on: a shared-GPU container over its budget for %d sample(s) is restarted",
                     self.strikes)
            super().start()

    def failed(self, exc: Exception) -> None:
        log.exception("the VRAM watch's round failed")

    async def run_once(self) -> None:
        running = await self.runtime.list_containers(all=False, detailed=False)
        budgets = {c.id: (b, c) for c in running if c.status == "running" and (b := budget_of(c)) > 0}
        if not budgets:
            self.over.clear()
            return
        processes = await asyncio.to_thread(self.monitor.process_memory)
        used = await asyncio.to_thread(per_container, processes, set(budgets), self.locate)
        self.over = {cid: n for cid, n in self.over.items() if cid in budgets}
        for cid, (budget, info) in budgets.items():
            size = used.get(cid, 0)
            if size <= budget:
                self.over.pop(cid, None)
                continue
            samples = self.over[cid] = self.over.get(cid, 0) + 1
            if samples >= self.strikes:
                await self._restart(info, size, budget, samples)

    async def _restart(self, info: ContainerInfo, size: int, budget: int, samples: int) -> None:
        cid = info.id
        self.over.pop(cid, None)
        try:
            await self.heal(cid, RESTART_TIMEOUT)
        except NotFound:
            return
        except ControllerError as exc:
            log.warning("could not restart container %s over its VRAM budget: %s", cid[:12], exc.message)
            return
        log.warning("restarted container %s (service %s): %d bytes of VRAM used, its budget %d, over for %d "
                    "sample(s)", cid[:12], info.service_id, size, budget, samples)
        if self.metrics is not None:
            self.metrics.gpu_memory_restarted(info.service_id or "")
        if self.audit is not None:
            await self.audit.record(AuditEvent(
                at=datetime.now(UTC), actor=self.audit.source, method="POST", path=f"/containers/{cid}/restart",
                target=cid, status_code=200,
                details={"reason": "gpu_memory_exceeded", "service_id": info.service_id,
                         "gpu": ",".join(info.gpu_device_ids), "used_bytes": size, "budget_bytes": budget,
                         "samples": samples}))
