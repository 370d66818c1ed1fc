"""The hub's Prometheus metrics (SPEC section 7), on a registry of its own so
that several hubs in one process (tests, dev mode) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mmanager.wire import USAGE_LABELS, USAGE_METRICS

SERVICE_STATUSES = ("pending", "starting", "running", "stopped", "failed", "migrating", "unhealthy", "lost")
ALERT_KINDS = ("cpu", "memory", "disk")


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._controller_series: dict[str, tuple[Gauge, ...]] = {}
        self.controller_up = Gauge("mmanager_controller_up", "1 when the controller is healthy", ["controller"], registry=r)
        self.containers_running = Gauge(
            "mmanager_containers_running", "Managed containers running, as the controller reports", ["controller"], registry=r
        )
        self.load_percentage = Gauge(
            "mmanager_load_percentage", "Managed containers as a share of MAX_CONTAINERS", ["controller"], registry=r
        )
        self.memory_usage_percent = Gauge(
            "mmanager_memory_usage_percent", "Host memory in use on the controller's server", ["controller"], registry=r
        )
        self.heartbeats_shed = Counter(
            "mmanager_heartbeats_shed_total",
            "Heartbeats answered 503 at once because MMANAGER_HEARTBEAT_BACKLOG were already waiting", registry=r)
        self.heartbeat_interval = Gauge(
            "mmanager_heartbeat_interval_seconds",
            "The heartbeat interval the hub answers (MMANAGER_HEARTBEAT_INTERVAL, stretched for a fleet bigger than "
            "MMANAGER_HEARTBEAT_MAX_RATE allows)", registry=r)
        self.heartbeat_batch = Histogram(
            "mmanager_heartbeat_batch_size", "Heartbeats recorded together in one transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.failovers = Counter("mmanager_failovers_total", "Services moved off a lost controller", registry=r)
        self.operations = Counter(
            "mmanager_operations_total", "Lifecycle operations by outcome", ["operation", "status"], registry=r
        )
        self.operation_duration = Histogram(
            "mmanager_operation_duration_seconds",
            "Time from an operation's start to its end",
            ["operation"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.services = Gauge("mmanager_services", "Services by status", ["status"], registry=r)
        self.controller_calls = Histogram(
            "mmanager_controller_call_duration_seconds",
            "Time the hub's calls to controllers take, retries included",
            ["controller", "call"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=r,
        )
        self.service_health = Gauge(
            "mmanager_service_health", "1 healthy, 0 unhealthy (services of unknown health are left out)",
            ["service"], registry=r,
        )
        self.alerts_active = Gauge("mmanager_alerts_active", "Open usage alerts", ["kind"], registry=r)
        self.alerts_total = Counter("mmanager_alerts_total", "Usage alerts opened", ["kind"], registry=r)
        for kind in ALERT_KINDS:
            self.alerts_active.labels(kind).set(0)
            self.alerts_total.labels(kind)
        self.disk_usage_percent = Gauge(
            "mmanager_disk_usage_percent", "Disk in use where the controller's Docker keeps its data",
            ["controller"], registry=r,
        )
        self.container_usage = {
            field: Gauge(name, text, USAGE_LABELS, registry=r)
            for field, (name, text) in USAGE_METRICS.items()
        }

    def observe_controller(self, controller_id: str, up: bool, running: int, load: float, memory: float) -> None:
        # Every controller's four series, each flush (twice a second): looked up once, not by labels() each time.
        series = self._controller_series.get(controller_id)
        if series is None:
            series = self._controller_series[controller_id] = tuple(
                g.labels(controller_id)
                for g in (self.controller_up, self.containers_running, self.load_percentage, self.memory_usage_percent))
        series[0].set(1 if up else 0)
        if up:
            series[1].set(running)
            series[2].set(load)
            series[3].set(memory)

    def set_service_counts(self, counts: dict[str, int]) -> None:
        for status in SERVICE_STATUSES:
            self.services.labels(status).set(counts.get(status, 0))

    def set_service_health(self, health: dict[str, str]) -> None:
        """Every service's health at once (services of unknown health, and deleted ones, have no series)."""
        self.service_health.clear()
        for service_id, state in health.items():
            if state in ("healthy", "unhealthy"):
                self.service_health.labels(service_id).set(1 if state == "healthy" else 0)
