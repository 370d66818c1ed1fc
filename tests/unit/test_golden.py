"""Golden-inference probes: the comparison (mmanager.golden), the spec's field (hub.schemas.ProbeSpec), the
wire's check that carries it, and the routing of a copy that has not passed it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from hub.schemas import MAX_PROBE_JSON, ServicePatch, ServiceSpec
from hub.services.gateway import _replicas
from hub.services.lifecycle.deploy import wire_check
from mmanager.golden import mismatch
from mmanager.wire import ContainerInfo, HealthCheck, HeartbeatContainer, probe_failed

# -- the comparison -------------------------------------------------------------


@pytest.mark.parametrize(("got", "expected"), [
    ({"a": 1, "extra": [1, 2]}, {"a": 1}),
    ({"data": {"p": 0.41235, "label": "x"}}, {"data": {"p": 0.4123}}),
    ([1, 2.0, "x", None, True], [1, 2, "x", None, True]),
    ({"a": []}, {"a": []}),
    ({}, {}),
    ("s", "s"),
    (None, None),
    (False, False),
    (3, 3.0),
])
def test_answers_that_match(got: Any, expected: Any) -> None:
    assert mismatch(got, expected, 1e-4) is None


@pytest.mark.parametrize(("got", "expected", "said"), [
    ({"data": {"prediction": 0.9871}}, {"data": {"prediction": 0.4123}},
     "data.prediction: expected 0.4123, got 0.9871"),
    ({"data": {}}, {"data": {"prediction": 0.4123}}, "data.prediction: missing (expected 0.4123)"),
    ({"data": [1, 2]}, {"data": [1, 2, 3]}, "data: expected 3 items, got 2"),
    ({"data": [1, 2, 4]}, {"data": [1, 2, 3]}, "data[2]: expected 3, got 4"),
    ({"e": [[0.1], [0.5]]}, {"e": [[0.1], [0.2]]}, "e[1][0]: expected 0.2, got 0.5"),
    ({"a": "1"}, {"a": 1}, 'a: expected 1, got "1"'),
    ({"a": 1}, {"a": "1"}, 'a: expected "1", got 1'),
    ({"a": 1}, {"a": {"b": 1}}, "a: expected an object, got 1"),
    ({"a": {"0": 1}}, {"a": [1]}, 'a: expected a list, got {"0":1}'),
    ([1], {"a": 1}, "the answer: expected an object, got [1]"),
    ({"a": None}, {"a": 0}, "a: expected 0, got null"),
    ({"a": 0}, {"a": None}, "a: expected null, got 0"),
    ({"label": "enhancer"}, {"label": "promoter"}, 'label: expected "promoter", got "enhancer"'),
])
def test_answers_that_do_not_match_say_where_and_what(got: Any, expected: Any, said: str) -> None:
    assert mismatch(got, expected, 1e-4) == said


def test_the_tolerance_is_inclusive_and_absolute() -> None:
    assert mismatch(1.5, 1.0, 0.5) is None
    assert mismatch(0.5, 1.0, 0.5) is None
    assert mismatch(1.5000001, 1.0, 0.5) == "the answer: expected 1.0, got 1.5000001"
    assert mismatch(1.0, 1.0, 0.0) is None
    assert mismatch(1.0 + 1e-12, 1.0, 0.0) is not None
    assert mismatch(-0.00005, 0.00005, 1e-4) is None
    # Huge and odd numbers never match by accident.
    assert mismatch(10**400, 1.0, 1e300) is not None
    assert mismatch(float("nan"), 1.0, 1e9) is not None
    assert mismatch(float("inf"), 1.0, 1e9) is not None


def test_bools_are_not_numbers() -> None:
    assert mismatch(True, 1, 1.0) == "the answer: expected 1, got true"
    assert mismatch(1, True, 1.0) == "the answer: expected true, got 1"
    assert mismatch(0, False, 0.0) == "the answer: expected false, got 0"
    assert mismatch(False, 0.0, 1.0) == "the answer: expected 0.0, got false"
    assert mismatch(True, True, 0.0) is None
    assert mismatch({"ok": [True]}, {"ok": [1]}, 0.5) == "ok[0]: expected 1, got true"


def test_long_values_are_cut_short() -> None:
    said = mismatch("x" * 500, "y", 0.0)
    assert said is not None and said.endswith("...") and len(said) < 120


# -- the spec ---------------------------------------------------------------------

CHECK = {"port": 5000, "path": "/health"}
PROBE = {"path": "/predict", "body": {"sequences": ["ACGT"]}, "expect": {"data": {"prediction": 0.4123}}}


def spec(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": "m", "image": "img", "health_check": CHECK, **fields})


def test_a_probe_is_validated() -> None:
    probe = spec(probe=PROBE).probe
    assert probe is not None and probe.tolerance == 1e-4 and probe.expect == {"data": {"prediction": 0.4123}}
    assert spec(probe={**PROBE, "expect": None, "tolerance": 0}).probe is not None
    for bad in ({**PROBE, "path": "predict"}, {**PROBE, "tolerance": -1}, {**PROBE, "body": [1]},
                {**PROBE, "unknown": 1}, {"path": "/p", "body": {}}, {**PROBE, "tolerance": float("inf")},
                {**PROBE, "body": {"s": "x" * MAX_PROBE_JSON}}, {**PROBE, "expect": ["y" * MAX_PROBE_JSON]},
                {**PROBE, "expect": float("nan")}):
        with pytest.raises(ValidationError):
            spec(probe=bad)
    assert ServicePatch.model_validate({"probe": PROBE}).probe is not None


def test_the_probe_travels_in_the_health_check() -> None:
    with_probe = wire_check(spec(probe=PROBE))
    assert with_probe is not None and with_probe.probe is not None
    assert with_probe.probe.path == "/predict" and with_probe.probe.body == {"sequences": ["ACGT"]}
    # Read back from the label as written.
    assert HealthCheck.model_validate_json(with_probe.model_dump_json()) == with_probe
    plain = wire_check(spec())
    assert plain is not None and "probe" not in json.loads(plain.model_dump_json())
    assert wire_check(ServiceSpec(name="m", image="img")) is None


def test_the_detail_is_sent_only_when_there_is_one() -> None:
    quiet = HeartbeatContainer(container_id="c", name="n", state="running")
    assert "health_detail" not in quiet.model_dump(mode="json")
    loud = HeartbeatContainer(container_id="c", name="n", state="running", health="unhealthy",
                              health_detail="probe /predict: a: expected 1, got 2")
    assert HeartbeatContainer.model_validate(loud.model_dump(mode="json")).health_detail == loud.health_detail
    info = ContainerInfo(id="c", container_id="c", name="n", image="i", status="running")
    assert "health_detail" not in info.model_dump(mode="json")
    assert probe_failed("probe /predict: a: expected 1, got 2")
    assert not probe_failed("GET http://127.0.0.1:5/health: HTTP 500") and not probe_failed(None)


def test_a_copy_with_a_probe_is_routed_only_once_healthy() -> None:
    def copy(name: str, health: str) -> dict[str, Any]:
        return {"container_id": name, "controller_id": "c1", "health": health,
                "endpoint": {"host": "10.0.0.1", "ports": {"5000": 30000 + len(name)}}}

    copies = [copy("good", "healthy"), copy("bad", "unhealthy"), copy("new", "unknown")]
    service = {"desired_state": "running", "spec": {"health_check": CHECK}}
    assert [(r["id"], r["state"]) for r in _replicas(service, copies)] == [
        ("good", "ready"), ("bad", "starting"), ("new", "starting")]
    probed = {"desired_state": "running", "spec": {"health_check": CHECK, "probe": PROBE}}
    assert [(r["id"], r["state"]) for r in _replicas(probed, copies)] == [("good", "ready")]
