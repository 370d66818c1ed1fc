"""The service's metrics, in one ``CollectorRegistry`` of its own: Prometheus text for scrapers, and seed
000's JSON summary (``model_metrics``/``system_metrics``) for clients that ask for JSON.

Names (all prefixed ``modelserver_``): ``requests_total{endpoint,task,outcome}``,
``request_duration_seconds{endpoint}`` (histogram), ``batch_size`` and ``batch_duration_seconds``
(histograms, one observation per forward pass), ``sequences_total{task}``, ``device_info{device,model}``
(1) and ``model_loaded`` (1 once the model answers, else 0).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 100, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def memory_bytes() -> int:
    """This process's resident memory."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GB"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("modelserver_requests", "Inference requests by endpoint, task and outcome",
                                ["endpoint", "task", "outcome"], registry=self.registry)
        self.latency = Histogram("modelserver_request_duration_seconds", "Inference request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("modelserver_batch_size", "Sequences per forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_duration = Histogram("modelserver_batch_duration_seconds", "Time of one forward pass",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sequences = Counter("modelserver_sequences", "Sequences answered", ["task"], registry=self.registry)
        self.device = Gauge("modelserver_device_info", "The device and model this process serves",
                            ["device", "model"], registry=self.registry)
        self.loaded = Gauge("modelserver_model_loaded", "1 once the model is loaded and answers",
                            registry=self.registry)
        self._count = 0
        self._failed = 0
        self._seconds = 0.0

    def observe_request(self, endpoint: str, task: str, outcome: str, seconds: float, sequences: int) -> None:
        self.requests.labels(endpoint, task, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)
        self._count += 1
        self._seconds += seconds
        if outcome == "success":
            self.sequences.labels(task).inc(sequences)
        else:
            self._failed += 1

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self, model_dir: Path, gpu_utilization: float | None) -> dict[str, Any]:
        """Seed 000's ``/metrics`` data."""
        try:
            disk: str | None = human(shutil.disk_usage(model_dir).used)
        except OSError:
            disk = None
        load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
        rss = human(memory_bytes())
        return {
            "model_metrics": {
                "total_requests": self._count,
                "successful_requests": self._count - self._failed,
                "failed_requests": self._failed,
                "average_response_time": round(self._seconds / self._count, 6) if self._count else 0.0,
                "gpu_utilization": gpu_utilization,
                "memory_usage": rss,
            },
            "system_metrics": {"cpu_usage": round(load, 4) if load is not None else None, "memory_usage": rss,
                               "disk_usage": disk, "network_io": None},
        }
