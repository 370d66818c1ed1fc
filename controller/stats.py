"""Docker stats of the running managed containers, sampled in the background.

``StatsSampler`` wakes every ``MMANAGER_STATS_INTERVAL`` seconds, lists the
running managed containers (one cheap Docker call) and reads each one's stats
once (a one-shot read). Docker's stats collector reads its subscribed
containers in one pass a second, and a read waits for the next pass (Docker's
own two readings, ``stream=False``, for two); reads in flight together share a
pass, so a round costs about a second per ``STATS_READS`` containers (the
runtime's reads at once, on connections of their own).

CPU is ``docker stats``'s formula applied between this round's reading of a
container and the previous round's, kept per container id until the container
goes: for a steady load the same figure as ``GET /containers/{id}/stats``
(Docker's two readings), averaged over the interval instead of its last
second. A container's first reading (new, or the sampler's first round) gives
no CPU figure, so it has no sample until the next round: an unknown CPU is
left out, not published as 0, which would drag the hub's averages down. A
container restarted under the same id counts from 0 again and starts afresh
the same way: its reading carries Docker's ``StartedAt``, and a reading of
another start than the previous one's is a first reading, whether the new
counter is below the old or, a short-lived earlier run, above it.

The latest sample per container is kept in memory: the heartbeat carries it to
the hub, the container listing shows it as ``resource_usage`` (for a hub that
polls), and ``/metrics`` exports it as ``mmanager_container_*`` gauges. A
container that stops or goes away loses its sample and its series; a read that
fails keeps the previous sample until the next interval. A container removed
while the round reads it (stops, deletes, moves, orphan removal) costs only its
own sample, quietly; a read that fails unexpectedly costs only that container's
sample too, and is logged once until that container reads again.

Where the GPU monitor runs (NVML answers), a container given GPUs also gets its
VRAM (NVML's compute processes mapped to containers as ``controller.vram`` maps
them) and its GPUs' mean utilisation from the monitor's latest samples: NVML
gives no per-process utilisation, so a shared GPU's whole use shows in each of
its containers. A VRAM that cannot be told (NVML gave no process list for one
of its GPUs) is None, not 0; NVML failing costs only these fields, never the
round's CPU and memory samples.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from controller.config import ControllerSettings
from controller.errors import ControllerError, NotFound
from controller.gpu_monitor import GpuMonitor
from controller.health import ControllerMetrics
from controller.runtime import STATS_READS, Runtime, cpu_percent
from controller.schemas import ContainerStats
from controller.vram import container_of, per_container
from mmanager.loops import LoopService
from mmanager.wire import ContainerInfo, ContainerUsage, GpuUsage

log = logging.getLogger(__name__)


def gpu_use(running: list[ContainerInfo], samples: list[GpuUsage], processes: list[tuple[str, int, int]] | None,
            locate: Callable[[int], str | None], unread: Collection[str] = ()) -> dict[str, tuple[int | None, float | None]]:
    """Each running container given GPUs: (VRAM bytes, mean utilisation percent of its GPUs). VRAM is None
    when it cannot be told: no process list at all (``processes`` None), a GPU of the container's whose
    list NVML did not give (``unread``: failed or unsupported), or processes that map to no container at
    all (no host PID namespace); else the sum over its processes (0: none). Utilisation is None when no GPU
    of its has a reading."""
    given = {c.id: c.gpu_device_ids for c in running if c.gpu_device_ids}
    if not given:
        return {}
    listed = processes or []
    located = {pid: locate(pid) for _, pid, _ in listed}
    blind = processes is None or (bool(listed) and not any(located.values()))
    used = {} if blind else per_container(listed, set(given), located.get)
    utilization = {s.index: s.utilization_percent for s in samples if not s.lost and s.utilization_percent is not None}
    out: dict[str, tuple[int | None, float | None]] = {}
    for cid, gpus in given.items():
        readings = [utilization[g] for g in gpus if g in utilization]
        known = not blind and not any(g in unread for g in gpus)
        out[cid] = (used.get(cid, 0) if known else None,
                    round(sum(readings) / len(readings), 3) if readings else None)
    return out


def usage_of(stats: ContainerStats, cpu: float, now: datetime) -> ContainerUsage:
    return ContainerUsage(
        sampled_at=now,
        cpu_percent=max(cpu, 0.0),
        memory_bytes=stats.memory_usage,
        memory_percent=stats.memory_percent,
        network_rx_bytes=stats.network_rx_bytes,
        network_tx_bytes=stats.network_tx_bytes,
        block_read_bytes=stats.block_read_bytes,
        block_write_bytes=stats.block_write_bytes,
    )


class StatsSampler(LoopService):
    name = "stats-sampler"
    # A round (Docker's reads in flight) is not waited for on the way out.
    cancel_on_stop = True

    def __init__(self, settings: ControllerSettings, runtime: Runtime, metrics: ControllerMetrics,
                 *, max_concurrent: int = STATS_READS, gpus: GpuMonitor | None = None,
                 locate: Callable[[int], str | None] = container_of) -> None:
        super().__init__(settings.stats_interval, jitter=0.0)
        self.runtime = runtime
        self.metrics = metrics
        self.gpus = gpus
        self.locate = locate
        self._max_concurrent = max_concurrent
        self._latest: dict[str, ContainerUsage] = {}
        # Each running container's previous reading: (its CPU time, the host's, nanoseconds; its StartedAt).
        self._readings: dict[str, tuple[int, int, str | None]] = {}
        # Containers whose last read failed unexpectedly (already logged once).
        self._failing: set[str] = set()

    def usage(self, container_id: str) -> ContainerUsage | None:
        return self._latest.get(container_id)

    def decorate(self, info: ContainerInfo) -> ContainerInfo:
        """The container as the listing shows it: with its latest sample as ``resource_usage``."""
        usage = self._latest.get(info.id)
        if usage is None:
            return info
        return info.model_copy(update={"resource_usage": usage.model_dump(mode="json")})

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self.interval > 0:
            super().start()

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, ControllerError):
            log.warning("stats sampling skipped: %s", exc.message)
        else:
            log.exception("stats sampling failed")

    def overran(self, took: float) -> None:
        log.warning("sampling stats took %.1fs, longer than MMANAGER_STATS_INTERVAL (%gs)", took, self.interval)

    # -- one round ---------------------------------------------------------

    async def run_once(self) -> None:
        """Sample every running managed container once."""
        running = await self.runtime.list_containers(all=False, detailed=False)
        slots = asyncio.Semaphore(self._max_concurrent)
        gone: set[str] = set()

        async def sample(info: ContainerInfo) -> tuple[str, ContainerUsage | None]:
            async with slots:
                try:
                    stats = await self.runtime.stats(info.id, one_shot=True)
                except NotFound:
                    # Removed since the listing: an ordinary race, not an error.
                    gone.add(info.id)
                    return info.id, None
                except ControllerError as exc:
                    log.debug("no stats for %s this round: %s", info.name, exc.message)
                    return info.id, self._latest.get(info.id)
                except Exception:
                    if info.id not in self._failing:
                        log.warning("stats of %s unreadable; its previous sample stays", info.name, exc_info=True)
                        self._failing.add(info.id)
                    return info.id, self._latest.get(info.id)
            self._failing.discard(info.id)
            if not stats.system_cpu_usage_ns:
                # Docker's answer for a container no longer running (stopped since the listing): no counters to
                # keep, so a start under the same id is a first reading, not a delta against zeros.
                self._readings.pop(info.id, None)
                return info.id, None
            before = self._readings.get(info.id)
            self._readings[info.id] = (stats.cpu_usage_ns, stats.system_cpu_usage_ns, stats.started_at)
            # Another start than the previous reading's: its counters began again, no delta against the old run's.
            cpu = None if before is None or before[2] != stats.started_at else cpu_percent(
                stats.cpu_usage_ns, stats.system_cpu_usage_ns, before[0], before[1], stats.online_cpus)
            return info.id, None if cpu is None else usage_of(stats, cpu, datetime.now(UTC))

        results = dict(await asyncio.gather(*(sample(info) for info in running)))
        alive = {info.id for info in running} - gone
        self._readings = {cid: reading for cid, reading in self._readings.items() if cid in alive}
        self._failing &= alive
        latest = {cid: usage for cid, usage in results.items() if usage is not None}
        if self.gpus is not None and self.gpus.started and any(info.gpu_device_ids for info in running):
            latest = await self._with_gpu_use(running, latest, self.gpus)
        self._latest = latest
        self.metrics.set_usage(
            {info.id: (info.service_id or "", info.name, self._latest[info.id])
             for info in running if info.id in self._latest}
        )

    async def _with_gpu_use(self, running: list[ContainerInfo], latest: dict[str, ContainerUsage],
                            gpus: GpuMonitor) -> dict[str, ContainerUsage]:
        """``latest`` with the GPU containers' VRAM and utilisation. Whatever NVML does costs at most these
        fields (left None), never the round's CPU and memory samples."""
        processes: list[tuple[str, int, int]] | None
        unread: set[str] = set()
        try:
            processes, unread = await asyncio.to_thread(gpus.process_reads)
        except Exception:
            log.warning("GPU processes unreadable this round: the containers' VRAM is unknown", exc_info=True)
            processes = None
        try:
            use = await asyncio.to_thread(gpu_use, running, gpus.latest, processes, self.locate, unread)
        except Exception:
            log.warning("GPU use not told this round", exc_info=True)
            return latest
        out = dict(latest)
        for cid, (memory, utilization) in use.items():
            if cid in out:
                out[cid] = out[cid].model_copy(update={"gpu_memory_bytes": memory, "gpu_util_percent": utilization})
        return out
