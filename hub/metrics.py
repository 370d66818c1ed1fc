"""The hub's Prometheus metrics (docs/OPERATIONS.md), on a registry of its own so
that several hubs in one process (tests, dev mode) do not collide.

The families with a series per controller, per service or per container are ``WideGauges``, written
into the exposition directly rather than through ``prometheus_client``, which keeps an object with a
lock for each series and validates and escapes every line again on every scrape: a large fleet has
hundreds of thousands of such lines, and a scrape must stay well within Prometheus's timeout while
the hub's one event loop waits. ``bench/metrics_scrape.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmanager.wire import GPU_LABELS, GPU_METRICS, USAGE_LABELS, USAGE_METRICS

SERVICE_STATUSES = ("pending", "starting", "running", "stopped", "failed", "migrating", "unhealthy", "lost")
ALERT_KINDS = ("cpu", "memory", "disk")

# Each controller's series, by the name WideGauges.set is given.
CONTROLLER_GAUGES = {
    "up": ("mmanager_controller_up", "1 when the controller is healthy"),
    "running": ("mmanager_containers_running", "Managed containers running, as the controller reports"),
    "load": ("mmanager_load_percentage", "Managed containers as a share of MAX_CONTAINERS"),
    "memory": ("mmanager_memory_usage_percent", "Host memory in use on the controller's server"),
    "disk": ("mmanager_disk_usage_percent", "Disk in use where the controller's Docker keeps its data"),
    "images": ("mmanager_controller_images", "Images the controller holds, as its heartbeats last listed them"),
}
SERVICE_HEALTH = {"health": ("mmanager_service_health",
                             "1 healthy, 0 unhealthy (services of unknown health are left out)")}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class WideGauges:
    """Gauges that share their label names and have many series (one per controller, service or container),
    written straight into Prometheus's text format (``render``).

    A series is its labels' text, made once, and one value per gauge (None: that gauge has no series for
    these labels). What ``prometheus_client`` would write for the same values (tests/unit/test_metrics_exposition.py).
    """

    def __init__(self, gauges: Mapping[str, tuple[str, str]], labelnames: Sequence[str]) -> None:
        self.fields = tuple(gauges)
        self._index = {field: i for i, field in enumerate(self.fields)}
        self._names = [name for name, _ in gauges.values()]
        self._heads = [f"# HELP {name} {_escape_help(text)}\n# TYPE {name} gauge\n" for name, text in gauges.values()]
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], tuple[str, list[float | None]]] = {}

    def _new(self, labels: tuple[str, ...]) -> tuple[str, list[float | None]]:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"labels {labels!r} for {self.labelnames!r}")
        text = ",".join(f'{name}="{_escape_label(value)}"' for name, value in zip(self.labelnames, labels, strict=True))
        series = self._series[labels] = ("{" + text + "}", [None] * len(self.fields))
        return series

    def set(self, labels: tuple[str, ...], **values: float | None) -> None:
        """Set (None: remove) some gauges' series for these labels."""
        series = self._series.get(labels) or self._new(labels)
        for field, value in values.items():
            series[1][self._index[field]] = value
        if all(v is None for v in series[1]):
            del self._series[labels]

    def set_all(self, labels: tuple[str, ...], values: Iterable[float | None]) -> None:
        """Every gauge's value for these labels, in the order of ``fields`` (None: that gauge has no series)."""
        series = self._series.get(labels) or self._new(labels)
        series[1][:] = values

    def get(self, labels: tuple[str, ...], field: str) -> float | None:
        series = self._series.get(labels)
        return None if series is None else series[1][self._index[field]]

    def remove(self, labels: tuple[str, ...]) -> None:
        self._series.pop(labels, None)

    def replace(self, values: Mapping[tuple[str, ...], float], field: str) -> None:
        """Only these series, with these values (the labels' text of those kept is reused)."""
        i = self._index[field]
        old, self._series = self._series, {}
        for labels, value in values.items():
            series = old.get(labels) or self._new(labels)
            series[1][i] = value
            self._series[labels] = series

    def __len__(self) -> int:
        return len(self._series)

    def render(self) -> str:
        parts: list[str] = []
        series = list(self._series.values())
        for i, (head, name) in enumerate(zip(self._heads, self._names, strict=True)):
            parts.append(head)
            parts.extend([f"{name}{text} {float(value)!r}\n"
                          for text, values in series if (value := values[i]) is not None])
        return "".join(parts)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.controllers = WideGauges(CONTROLLER_GAUGES, ("controller",))
        self.containers = WideGauges(USAGE_METRICS, USAGE_LABELS)
        self.service_health = WideGauges(SERVICE_HEALTH, ("service",))
        self.gpus = WideGauges(GPU_METRICS, GPU_LABELS)
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
        self.controllers_suspected = Counter(
            "mmanager_controllers_suspected_total",
            "Controllers whose presence stream broke without a bye, by what the probe of their address found "
            "(confirmed: refused, marked lost at once; cleared: left to the heartbeat grace)", ["outcome"], registry=r)
        self.presence_streams = Gauge(
            "mmanager_presence_streams", "Presence streams controllers hold open to this replica", registry=r)
        for outcome in ("confirmed", "cleared"):
            self.controllers_suspected.labels(outcome)
        self.failovers = Counter("mmanager_failovers_total", "Services moved off a lost controller", registry=r)
        self.prefetch_pulls = Counter(
            "mmanager_prefetch_pulls_total", "Images pre-pulled onto a likely failover target, by outcome",
            ["outcome"], registry=r)
        for outcome in ("pulled", "failed"):
            self.prefetch_pulls.labels(outcome)
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
            # Not by controller: that label gives every controller a histogram per kind of call, most of a
            # large fleet's scrape. A controller that does not answer shows as mmanager_controller_up.
            ["call"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=r,
        )
        self.alerts_active = Gauge("mmanager_alerts_active", "Open usage alerts", ["kind"], registry=r)
        self.alerts_total = Counter("mmanager_alerts_total", "Usage alerts opened", ["kind"], registry=r)
        for kind in ALERT_KINDS:
            self.alerts_active.labels(kind).set(0)
            self.alerts_total.labels(kind)

    def observe_controller(self, controller_id: str, up: bool, running: int, load: float, memory: float) -> None:
        if up:
            self.controllers.set((controller_id,), up=1, running=running, load=load, memory=memory)
        else:
            self.controller_down(controller_id)

    def controller_down(self, controller_id: str) -> None:
        self.controllers.set((controller_id,), up=0)

    def set_service_counts(self, counts: dict[str, int]) -> None:
        for status in SERVICE_STATUSES:
            self.services.labels(status).set(counts.get(status, 0))

    def set_service_health(self, health: Mapping[str, str]) -> None:
        """Every service's health at once (services of unknown health, and deleted ones, have no series)."""
        self.service_health.replace({(service_id,): 1 if state == "healthy" else 0 for service_id, state in health.items()
                                     if state in ("healthy", "unhealthy")}, "health")

    def wide(self) -> str:
        """The exposition of the wide families, to follow ``generate_latest(registry)``."""
        return (self.controllers.render() + self.containers.render() + self.service_health.render()
                + self.gpus.render())


def exposition(metrics: HubMetrics) -> bytes:
    """What ``/metrics`` answers: the registry's families, then the wide ones."""
    return generate_latest(metrics.registry) + metrics.wide().encode()
