"""The hub's wide families (hub.metrics.WideGauges) say what prometheus_client would say for the same series."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hub.metrics import CONTROLLER_GAUGES, HubMetrics, WideGauges, exposition

GAUGES = {"cpu": ("t_cpu_percent", "CPU use, percent of one core"),
          "mem": ("t_memory_bytes", 'Memory "in use"\nand a back\\slash')}
LABELS = ("controller", "service", "container")
# Label values a container name or an id could hold, and some no one should send but that must not break a scrape.
SERIES = {
    ("ctl-1", "svc-a", "mm-a-1-ctl-1"): [12.5, 1048576.0],
    ("ctl-2", "", 'odd"name\\with\nnewline'): [0.0, 3.0],
    ("ctl-3", "svc-ü", "mm-ü"): [1e-7, 1e20],
    ("ctl-4", "svc-x", "mm-x"): [math.inf, -math.inf],
}


def _parsed(text: str) -> dict[str, tuple[str, str, set[tuple[tuple[tuple[str, str], ...], float]]]]:
    return {f.name: (f.documentation, f.type, {(tuple(sorted(s.labels.items())), s.value) for s in f.samples})
            for f in text_string_to_metric_families(text)}


def _reference(series: dict[tuple[str, ...], list[float]]) -> str:
    registry = CollectorRegistry()
    gauges = [Gauge(name, text, LABELS, registry=registry) for name, text in GAUGES.values()]
    for labels, values in series.items():
        for gauge, value in zip(gauges, values, strict=True):
            gauge.labels(*labels).set(value)
    return generate_latest(registry).decode()


def test_the_same_families_series_and_values_as_prometheus_client() -> None:
    wide = WideGauges(GAUGES, LABELS)
    for labels, values in SERIES.items():
        wide.set_all(labels, values)
    assert _parsed(wide.render()) == _parsed(_reference(SERIES))


def test_series_come_and_go() -> None:
    wide = WideGauges(GAUGES, LABELS)
    a, b = ("ctl-1", "s", "c1"), ("ctl-1", "s", "c2")
    wide.set_all(a, [1.0, 2.0])
    wide.set(b, cpu=5.0)  # only one of the two gauges
    wide.set_all(a, [3.0, 4.0])  # set again: the new values, one series still
    families = _parsed(wide.render())

    def labelled(labels: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(zip(LABELS, labels, strict=True)))

    assert families["t_cpu_percent"][2] == {(labelled(a), 3.0), (labelled(b), 5.0)}
    assert families["t_memory_bytes"][2] == {(labelled(a), 4.0)}
    wide.set(b, cpu=None)  # no value left: no series
    assert len(wide) == 1 and wide.get(b, "cpu") is None
    wide.remove(a)
    assert len(wide) == 0
    assert _parsed(wide.render()) == _parsed(_reference({}))  # each family still says what it is

    wide.replace({a: 1.0, b: 0.0}, "cpu")
    wide.replace({b: 1.0}, "cpu")  # a is gone, b changed
    assert wide.get(a, "cpu") is None and wide.get(b, "cpu") == 1.0 and len(wide) == 1


def test_the_hubs_exposition_names_each_family_once() -> None:
    metrics = HubMetrics()
    metrics.observe_controller("ctl-1", True, 3, 30.0, 40.0)
    metrics.observe_controller("ctl-2", False, 0, 0.0, 0.0)
    metrics.controllers.set(("ctl-1",), disk=55.0)
    metrics.containers.set_all(("ctl-1", "svc", "mm-svc"), range(len(metrics.containers.fields)))
    metrics.set_service_health({"svc": "healthy", "other": "unhealthy", "third": "unknown"})
    text = exposition(metrics).decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(names) == len(set(names))
    families = _parsed(text)
    assert families["mmanager_controller_up"][2] == {((("controller", "ctl-1"),), 1.0),
                                                      ((("controller", "ctl-2"),), 0.0)}
    # A controller that is not up keeps no load of its own: only its up series is new.
    assert families["mmanager_load_percentage"][2] == {((("controller", "ctl-1"),), 30.0)}
    assert families["mmanager_disk_usage_percent"][2] == {((("controller", "ctl-1"),), 55.0)}
    assert families["mmanager_service_health"][2] == {((("service", "svc"),), 1.0), ((("service", "other"),), 0.0)}
    assert families["mmanager_container_memory_bytes"][2] == {
        ((("container", "mm-svc"), ("controller", "ctl-1"), ("service", "svc")), 1.0)}
    assert set(CONTROLLER_GAUGES) == set(metrics.controllers.fields)
