"""Placement, with no server running: nodes from small factories, asserts on
the choice, the order and every rejection reason."""

from collections import Counter
from dataclasses import replace

from hub.scheduler import ControllerView, PlacementRequest, place
from hub.scheduler.placement import GIB


def node(id: str, **kw) -> ControllerView:
    base = dict(server_type="cpu", cpu_cores=16.0, memory_total=64 * GIB)
    base.update(kw)
    return ControllerView(id=id, **base)


def gpu_node(id: str, gpus: int = 2, **kw) -> ControllerView:
    return node(id, server_type="gpu", gpus=tuple(str(i) for i in range(gpus)), **kw)


def run_many(nodes: list[ControllerView], n: int, request: PlacementRequest = PlacementRequest()) -> Counter:
    """Place ``n`` services one after another, counting each placement on its node."""
    by_id = {c.id: c for c in nodes}
    counts: Counter = Counter()
    for _ in range(n):
        decision = place(by_id.values(), request)
        assert decision.placed, decision.rejections
        chosen = by_id[decision.controller_id]
        by_id[chosen.id] = replace(chosen, containers=chosen.containers + 1)
        counts[chosen.id] += 1
    return counts


def test_weights_share_load_in_proportion():
    counts = run_many([node("a", weight=150, max_containers=5000), node("b", weight=100, max_containers=5000)], 1000)
    assert abs(counts["a"] / 1000 - 0.60) <= 0.02
    assert abs(counts["b"] / 1000 - 0.40) <= 0.02


def test_smallest_priority_tier_wins_until_full():
    nodes = [node("primary", priority=1, max_containers=3), node("backup", priority=2)]
    counts = run_many(nodes, 5)
    assert counts == Counter({"primary": 3, "backup": 2})


def test_gpu_service_goes_only_where_gpus_are_free():
    nodes = [node("cpu-1"), gpu_node("gpu-busy", gpus=2, gpus_used=frozenset({"0", "1"})), gpu_node("gpu-free", gpus=2)]
    decision = place(nodes, PlacementRequest(gpu_count=2))
    assert decision.controller_id == "gpu-free"
    assert decision.gpu_devices == ("0", "1")
    reasons = {r.controller_id: r.code for r in decision.rejections}
    assert reasons == {"cpu-1": "SERVER_TYPE", "gpu-busy": "GPUS"}


def test_gpu_devices_skip_used_ones():
    decision = place([gpu_node("g", gpus=4, gpus_used=frozenset({"0", "2"}))], PlacementRequest(gpu_count=1))
    assert decision.gpu_devices == ("1",)


def test_cpu_service_prefers_cpu_even_at_worse_priority():
    nodes = [gpu_node("gpu-1", priority=1), node("cpu-1", priority=5)]
    decision = place(nodes, PlacementRequest())
    assert decision.controller_id == "cpu-1"
    assert decision.gpu_devices == ()


def test_cpu_service_falls_back_to_other_types_without_a_gpu():
    nodes = [gpu_node("gpu-1"), node("edge-1", server_type="edge", priority=2), node("cpu-1", enabled=False)]
    decision = place(nodes, PlacementRequest())
    assert decision.controller_id == "gpu-1"
    assert decision.gpu_devices == ()


def test_explicit_server_type_is_honoured():
    nodes = [node("cpu-1"), node("edge-1", server_type="edge", priority=9)]
    assert place(nodes, PlacementRequest(server_type="edge")).controller_id == "edge-1"


def test_capacity_memory_cpu_and_max_containers():
    nodes = [
        node("full", max_containers=2, containers=2),
        node("small-mem", memory_total=4 * GIB, memory_reserved=3 * GIB),
        node("small-cpu", cpu_cores=2.0, cpu_reserved=1.5),
        node("roomy", priority=3),
    ]
    decision = place(nodes, PlacementRequest(memory=2 * GIB, cpu=1.0))
    assert decision.controller_id == "roomy"
    reasons = {r.controller_id: r.code for r in decision.rejections}
    assert reasons == {"full": "MAX_CONTAINERS", "small-mem": "MEMORY", "small-cpu": "CPU"}


def test_no_controller_says_why_for_each():
    nodes = [
        node("off", enabled=False),
        node("down", healthy=False),
        node("drain", draining=True),
        node("gone"),
    ]
    decision = place(nodes, PlacementRequest(exclude=frozenset({"gone"})))
    assert not decision.placed
    assert [(r.controller_id, r.code) for r in decision.rejections] == [
        ("down", "UNHEALTHY"),
        ("drain", "DRAINING"),
        ("gone", "EXCLUDED"),
        ("off", "DISABLED"),
    ]
    assert all(r.reason for r in decision.rejections)


def test_ties_break_deterministically_on_id():
    nodes = [node("b"), node("c"), node("a")]
    assert place(nodes, PlacementRequest()).controller_id == "a"
    assert place(list(reversed(nodes)), PlacementRequest()).controller_id == "a"
    assert list(run_many(nodes, 3)) == ["a", "b", "c"]


def test_existing_load_counts_against_weight():
    nodes = [node("heavy", weight=200, containers=10), node("light", weight=100, containers=2)]
    # heavy would be at 11/200 = 0.055, light at 3/100 = 0.03
    assert place(nodes, PlacementRequest()).controller_id == "light"


def test_a_probed_service_goes_only_where_golden_probes_run():
    from hub.scheduler.placement import CandidateIndex

    old, new = node("a-old", priority=0), node("b-new", golden_probes=True)
    probed = PlacementRequest(golden_probe=True)
    # A controller that does not say it runs them (an older one) is skipped, with the reason.
    decision = place([old, new], probed)
    assert decision.controller_id == "b-new"
    assert CandidateIndex([old, new]).place(probed).controller_id == "b-new"
    refused = place([old], probed)
    assert not refused.placed
    assert [(r.controller_id, r.code, r.reason) for r in refused.rejections] == [
        ("a-old", "NO_GOLDEN_PROBES", "controller does not run golden probes")]
    assert CandidateIndex([old]).place(probed).rejections == refused.rejections
    # A service without a probe goes anywhere, as before.
    assert place([old, new], PlacementRequest()).controller_id == "a-old"


def test_the_controller_advertises_golden_probes():
    from controller.health import docker_down_health
    from mmanager.wire import HealthCapabilities
    from tests.controller.conftest import make_settings

    assert docker_down_health(make_settings("c"), "down").capabilities.golden_probes is True
    # A report without the field (an older controller) reads as one that does not run them.
    assert HealthCapabilities.model_validate({"gpu_support": False, "max_memory_gb": 1}).golden_probes is False
