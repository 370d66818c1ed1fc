"""Each GPU's utilisation, memory, temperature and power, sampled through NVML in the background.

``GpuMonitor`` initialises NVML once and, every ``MMANAGER_STATS_INTERVAL`` seconds, reads every GPU
NVML counted at that time, in a worker thread (NVML calls block). Each GPU is read on its own: an
error on one leaves the others' samples whole. A GPU NVML no longer answers for (``GPU_IS_LOST``,
or one gone from the count) is reported ``lost``; a read NVML refuses is None in the sample and its
error is shown in ``error``; a read the GPU does not support (power on some boards) is just None.
Changes of state (lost, failing, recovered) are logged once, not on every round.

Without NVML (no library, no driver, no GPU) the monitor never starts and reports nothing: no
samples, no series, no heartbeat field. The latest samples go to the heartbeat and ``/health``
(``ControllerHealth.gpu_usage``) and to ``/metrics`` (``mmanager_gpu_*``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from controller.health import ControllerMetrics
from mmanager.loops import LoopService
from mmanager.wire import ControllerHealth, GpuUsage

log = logging.getLogger(__name__)

# NVML's return codes (nvml.h) that mean the GPU is gone rather than a read failed.
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_NOT_SUPPORTED = 3
_GONE = frozenset({NVML_ERROR_NOT_FOUND, NVML_ERROR_GPU_IS_LOST})
# nvmlTemperatureSensors_t: the GPU die.
NVML_TEMPERATURE_GPU = 0


def load_nvml() -> Any | None:
    """The pynvml module, or None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class _Lost(Exception):
    pass


class GpuMonitor(LoopService):
    name = "gpu-monitor"
    cancel_on_stop = True

    def __init__(self, interval: float, metrics: ControllerMetrics | None = None, *, nvml: Any | None = None) -> None:
        super().__init__(interval, jitter=0.0)
        self.metrics = metrics
        self._nvml = nvml
        self._count = 0
        self._started = False
        self.latest: list[GpuUsage] = []
        # Each GPU's last state, logged on change only: "ok", "lost" or the error's text.
        self._state: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> bool:
        """Initialise NVML and count the GPUs; False (and nothing more) without NVML or without a GPU."""
        nvml = self._nvml if self._nvml is not None else load_nvml()
        if nvml is None:
            return False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, or a library that fails to load
            log.info("GPU monitoring off: NVML is not available (%s)", exc)
            return False
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            log.warning("GPU monitoring off: NVML could not count the GPUs (%s)", exc)
            self._shutdown(nvml)
            return False
        if count == 0:
            self._shutdown(nvml)
            return False
        self._nvml, self._count = nvml, count
        return True

    def start(self) -> None:
        if self.interval > 0 and not self._started and self.open():
            self._started = True
            log.info("GPU monitoring on: %d GPU(s), every %gs", self._count, self.interval)
            super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._started:
            self._started = False
            self._shutdown(self._nvml)

    def failed(self, exc: Exception) -> None:
        log.exception("GPU sampling failed")

    def overran(self, took: float) -> None:
        log.warning("sampling GPUs took %.1fs, longer than MMANAGER_STATS_INTERVAL (%gs)", took, self.interval)

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)

    @property
    def started(self) -> bool:
        """NVML is open and the GPUs are sampled."""
        return self._started

    def process_memory(self) -> list[tuple[str, int, int]]:
        """Each GPU's compute processes as (GPU index, host pid, VRAM bytes) (blocking). A GPU NVML refuses
        is left out this round; a process whose use NVML does not give (no permission) is too."""
        return self.process_reads()[0]

    def process_reads(self) -> tuple[list[tuple[str, int, int]], set[str]]:
        """``process_memory``'s processes, and the indexes of the GPUs whose process list NVML did not give
        (the query failed or is unsupported): for those, no process listed is not no process."""
        nvml: Any = self._nvml
        found: list[tuple[str, int, int]] = []
        unread: set[str] = set()
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception as exc:
                log.debug("GPU %d: NVML gave no processes (%s)", index, exc)
                unread.add(str(index))
                continue
            if processes is None:
                unread.add(str(index))
                continue
            for p in processes:
                used = getattr(p, "usedGpuMemory", None)
                if used is not None:
                    found.append((str(index), int(p.pid), int(used)))
        return found, unread

    # -- sampling ----------------------------------------------------------

    async def run_once(self) -> None:
        self.latest = await asyncio.to_thread(self.sample)
        if self.metrics is not None:
            self.metrics.set_gpus(self.latest)

    def sample(self) -> list[GpuUsage]:
        """One round over every GPU counted at start (blocking: NVML answers from the driver)."""
        now = datetime.now(UTC)
        samples = [self._read(str(index), index, now) for index in range(self._count)]
        for s in samples:
            self._note(s)
        return samples

    def _read(self, gpu: str, index: int, now: datetime) -> GpuUsage:
        nvml: Any = self._nvml
        errors: list[str] = []

        def read(call: Any) -> Any:
            try:
                return call()
            except Exception as exc:
                code = getattr(exc, "value", None)
                if code in _GONE:
                    raise _Lost(str(exc)) from exc
                if code != NVML_ERROR_NOT_SUPPORTED:
                    errors.append(str(exc) or type(exc).__name__)
                return None

        try:
            handle = read(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
            if handle is None:
                # No handle for a GPU counted at start: it is no longer there.
                raise _Lost(errors[0] if errors else "no handle")
            rates = read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            memory = read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            temperature = read(lambda: nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU))
            milliwatts = read(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        except _Lost as exc:
            return GpuUsage(index=gpu, sampled_at=now, lost=True, error=str(exc))
        return GpuUsage(
            index=gpu,
            sampled_at=now,
            error="; ".join(errors) or None,
            utilization_percent=None if rates is None else float(rates.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_celsius=None if temperature is None else float(temperature),
            power_watts=None if milliwatts is None else milliwatts / 1000,
        )

    def _note(self, s: GpuUsage) -> None:
        state = "lost" if s.lost else (s.error or "ok")
        before = self._state.get(s.index, "ok")
        if state == before:
            return
        self._state[s.index] = state
        if s.lost:
            log.warning("GPU %s lost: NVML no longer answers for it (%s)", s.index, s.error)
        elif s.error:
            log.warning("GPU %s: NVML read failed: %s", s.index, s.error)
        else:
            log.info("GPU %s answers NVML again", s.index)


def with_gpu_usage(health: ControllerHealth, monitor: GpuMonitor | None) -> ControllerHealth:
    """The health with the monitor's latest samples (the same object when there are none)."""
    if monitor is None or not monitor.latest:
        return health
    return health.model_copy(update={"gpu_usage": monitor.latest})
