"""The per-container VRAM watch: a container that shares a GPU under a budget (``mmanager.gpu_memory``)
and uses more is restarted in place, audited and counted.

Each ``MMANAGER_STATS_INTERVAL`` seconds, on a host where NVML answers, the GPU processes NVML reports
(``nvmlDeviceGetComputeRunningProcesses``: pid and VRAM used) are mapped to containers by the container
id in ``/proc/<pid>/cgroup`` (so the controller needs the host's PID namespace: NVML reports host pids)
and summed per container. Invariant: a container is restarted only after ``MMANAGER_GPU_MEMORY_STRIKES``
consecutive samples over its budget (one sample may catch a transient peak, a framework's workspace
allocated and freed at once), at most once per such run of samples; each restart is an audit event
(shipped to the hub with the next heartbeat) and counts in ``mmanager_gpu_memory_restarts_total``.
A container restarted ``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds is not restarted again
(a model that needs more than its budget at every start would only loop): one more audit event
(``gpu_memory_restarts_stopped``) and a warning say so, and it is left running until the window has
passed; its owner raises ``gpu_memory`` or the hub's probes judge it. A restart happens only while the
container still runs under its service's lock (one the hub stopped meanwhile is not revived).
Where an MPS daemon runs, ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (set at create) stops the allocation
first; this watch is the backstop where it does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.audit import AuditTrail
from controller.errors import ContainerNotRunning, ControllerError, NotFound
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
# At most this many restarts of one container within RESTART_WINDOW seconds.
MAX_RESTARTS = 3
RESTART_WINDOW = 3600.0


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
                 locate: Callable[[int], str | None] = container_of,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(interval, jitter=0.0)
        self.runtime = runtime
        self.heal = heal
        self.monitor = monitor
        self.strikes = strikes
        self.audit = audit
        self.metrics = metrics
        self.locate = locate
        self.clock = clock
        # Container id -> consecutive samples over its budget.
        self.over: dict[str, int] = {}
        # Container id -> when it was restarted, within the window; those no longer restarted.
        self.restarts: dict[str, list[float]] = {}
        self.stopped: set[str] = set()
        # The warning that NVML's processes map to no container (no host PID namespace) was given.
        self._unmapped_told = False

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
        if processes and not used and not self._unmapped_told:
            await asyncio.to_thread(self._tell_if_unmapped, processes)
        self.over = {cid: n for cid, n in self.over.items() if cid in budgets}
        now = self.clock()
        self.restarts = {cid: kept for cid, times in self.restarts.items()
                         if cid in budgets and (kept := [t for t in times if now - t < RESTART_WINDOW])}
        self.stopped &= set(self.restarts)
        for cid, (budget, info) in budgets.items():
            size = used.get(cid, 0)
            if size <= budget:
                self.over.pop(cid, None)
                continue
            samples = self.over[cid] = self.over.get(cid, 0) + 1
            if samples >= self.strikes:
                await self._restart(info, size, budget, samples)

    def _tell_if_unmapped(self, processes: list[tuple[str, int, int]]) -> None:
        """Warn once when NVML reports GPU processes of which none is in any container: /proc shows no host
        pids here (the controller does not run in the host's PID namespace), so no budget can be enforced."""
        if any(self.locate(pid) is not None for _, pid, _ in processes):
            return
        self._unmapped_told = True
        log.warning("NVML reports %d GPU process(es) but none maps to a container: the VRAM watch cannot see "
                    "which container uses what (run the controller with the host's PID namespace, pid: host)",
                    len(processes))

    async def _restart(self, info: ContainerInfo, size: int, budget: int, samples: int) -> None:
        cid = info.id
        self.over.pop(cid, None)
        if cid in self.stopped:
            return
        done = self.restarts.get(cid, [])
        if len(done) >= MAX_RESTARTS:
            self.stopped.add(cid)
            log.warning("container %s (service %s) is over its VRAM budget again after %d restarts within %.0f s: "
                        "not restarting it again; raise its gpu_memory", cid[:12], info.service_id, len(done),
                        RESTART_WINDOW)
            await self._record(info, "gpu_memory_restarts_stopped", size, budget, samples, restarts=len(done))
            return
        try:
            await self.heal(cid, RESTART_TIMEOUT)
        except (NotFound, ContainerNotRunning):
            return
        except ControllerError as exc:
            log.warning("could not restart container %s over its VRAM budget: %s", cid[:12], exc.message)
            return
        log.warning("restarted container %s (service %s): %d bytes of VRAM used, its budget %d, over for %d "
                    "sample(s)", cid[:12], info.service_id, size, budget, samples)
        self.restarts[cid] = [*done, self.clock()]
        if self.metrics is not None:
            self.metrics.gpu_memory_restarted(info.service_id or "")
        await self._record(info, "gpu_memory_exceeded", size, budget, samples)

    async def _record(self, info: ContainerInfo, reason: str, size: int, budget: int, samples: int,
                      **more: Any) -> None:
        if self.audit is None:
            return
        cid = info.id
        await self.audit.record(AuditEvent(
            at=datetime.now(UTC), actor=self.audit.source, method="POST", path=f"/containers/{cid}/restart",
            target=cid, status_code=200 if reason == "gpu_memory_exceeded" else 409,
            details={"reason": reason, "service_id": info.service_id, "gpu": ",".join(info.gpu_device_ids),
                     "used_bytes": size, "budget_bytes": budget, "samples": samples, **more}))
