"""The CPU fallback rule on the pure scheduler: a table of cases (fleet, GPU ask, fallback -> controller,
whether it fell back, the GPU rejections, the fallback's rejections), the same answers from the
``CandidateIndex``, and the spec's validation of ``cpu_fallback``."""

from types import MappingProxyType

import pytest
from pydantic import ValidationError

from hub.scheduler import ControllerView, PlacementRequest, place
from hub.scheduler.placement import GIB, CandidateIndex
from hub.schemas import ServiceSpec
from hub.services.lifecycle.deploy import on_fallback, running_spec, runs_fallback


def gpu(id: str, cards: int = 1, used: tuple[str, ...] = (), shared: dict[str, int] | None = None,
        **kw) -> ControllerView:
    return ControllerView(
        id=id, server_type="gpu", cpu_cores=32.0, memory_total=256 * GIB,
        gpus=tuple(str(i) for i in range(cards)), gpu_models=("NVIDIA A100",) * cards,
        gpu_memory=(80 * GIB,) * cards, gpus_used=frozenset(used),
        gpu_shared=MappingProxyType({k: v * GIB for k, v in (shared or {}).items()}), **kw)


def cpu(id: str, **kw) -> ControllerView:
    return ControllerView(id=id, cpu_cores=16.0, memory_total=64 * GIB, **kw)


WHOLE = PlacementRequest(gpu_count=1, memory=GIB)
SHARED = PlacementRequest(gpu_memory=8 * GIB)
FALLBACK = PlacementRequest(memory=2 * GIB, cpu=2.0)

# (name, fleet, request, fallback, expected controller, fell back, {controller: GPU rejection},
#  {controller: fallback rejection})
CASES = [
    ("a free GPU wins over the fallback", [gpu("g"), cpu("c")], WHOLE, FALLBACK, "g", False, {}, {}),
    ("every GPU held: the fallback, on a cpu server", [gpu("g", used=("0",)), cpu("c")], WHOLE, FALLBACK,
     "c", True, {"g": "GPUS", "c": "SERVER_TYPE"}, {}),
    ("no fallback: nowhere", [gpu("g", used=("0",)), cpu("c")], WHOLE, None,
     None, False, {"g": "GPUS", "c": "SERVER_TYPE"}, {}),
    ("shared ask with no budget left falls back", [gpu("g", shared={"0": 78}), cpu("c")], SHARED, FALLBACK,
     "c", True, {"g": "NO_SHARED_GPU", "c": "SERVER_TYPE"}, {}),
    ("the fallback may run on the GPU server when no cpu server fits",
     [gpu("g", used=("0",)), cpu("c", memory_reserved=63 * GIB)], WHOLE, FALLBACK,
     "g", True, {"g": "GPUS", "c": "SERVER_TYPE"}, {}),
    ("the fallback prefers a cpu server to the GPU server", [gpu("g", used=("0",)), cpu("c")], WHOLE,
     FALLBACK, "c", True, {"g": "GPUS", "c": "SERVER_TYPE"}, {}),
    ("neither fits: both sets of reasons", [gpu("g", used=("0",), draining=True), cpu("c", memory_reserved=63 * GIB)],
     WHOLE, FALLBACK, None, False, {"g": "DRAINING", "c": "SERVER_TYPE"}, {"g": "DRAINING", "c": "MEMORY"}),
    ("a GPU controller that is down: the fallback", [gpu("g", healthy=False), cpu("c")], WHOLE, FALLBACK,
     "c", True, {"g": "UNHEALTHY", "c": "SERVER_TYPE"}, {}),
    ("the fallback keeps the exclusions", [gpu("g", used=("0",)), cpu("c"), cpu("d")],
     PlacementRequest(gpu_count=1, exclude=frozenset({"c"})), PlacementRequest(exclude=frozenset({"c"})),
     "d", True, {"g": "GPUS", "c": "EXCLUDED", "d": "SERVER_TYPE"}, {}),
    ("a CPU ask never uses its fallback", [cpu("c", memory_reserved=64 * GIB)], PlacementRequest(memory=GIB),
     FALLBACK, None, False, {"c": "MEMORY"}, {}),
]


@pytest.mark.parametrize(("fleet", "request_", "fallback", "controller", "fell_back", "gpu_reasons", "cpu_reasons"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_fallback_rule(fleet: list[ControllerView], request_: PlacementRequest, fallback: PlacementRequest | None,
                       controller: str | None, fell_back: bool, gpu_reasons: dict[str, str],
                       cpu_reasons: dict[str, str]) -> None:
    for decision in (place(fleet, request_, fallback), CandidateIndex(fleet).place(request_, fallback)):
        assert decision.controller_id == controller
        assert decision.fallback is fell_back
        if fell_back:
            assert decision.gpu_devices == ()
            assert {r.controller_id: r.code for r in decision.gpu_rejections} == gpu_reasons
        elif controller is None:
            assert {r.controller_id: r.code for r in decision.rejections} == gpu_reasons
            assert {r.controller_id: r.code for r in decision.fallback_rejections} == cpu_reasons
        else:
            assert decision.gpu_rejections == ()


def test_index_counts_the_fallback_as_a_cpu_placement() -> None:
    index = CandidateIndex([gpu("g", used=("0",)), cpu("c")])
    decision = index.place(WHOLE, FALLBACK)
    assert decision.fallback and decision.controller_id == "c"
    index.reserve("c", FALLBACK.memory, FALLBACK.cpu, decision.gpu_devices)
    view = index.get("c")
    assert view is not None and view.memory_reserved == 2 * GIB and view.containers == 1
    assert index.get("g").gpus_used == frozenset({"0"})  # type: ignore[union-attr]


SPEC = {"name": "s", "image": "gpu-image:1", "resources": {"gpu_count": 1, "memory_limit": "4GB"},
        "server_type": "gpu", "health_check": {"port": 5000},
        "cpu_fallback": {"image": "cpu-image:1", "resources": {"cpu_limit": 2, "memory_limit": "1GB"}}}


def test_the_running_spec_is_the_variant_its_gpus_say() -> None:
    spec = ServiceSpec.model_validate(SPEC)
    assert running_spec(spec, ("0",)) is spec and not runs_fallback(spec, ["0"])
    variant = running_spec(spec, ())
    assert runs_fallback(spec, []) and runs_fallback(spec.model_dump(mode="json"), [])
    assert variant.image == "cpu-image:1" and variant.server_type is None
    assert variant.resources.gpu_count == 0 and variant.resources.memory_limit == "1GB"
    plain = ServiceSpec.model_validate({"name": "p", "image": "x"})
    assert not runs_fallback(plain, []) and "cpu_fallback" not in plain.model_dump(mode="json")


@pytest.mark.parametrize(("change", "error_type"), [
    ({"cpu_fallback": {"image": "c", "resources": {"gpu_count": 1}}}, "cpu_fallback_gpu"),
    ({"cpu_fallback": {"image": "c", "resources": {"gpu_memory": "8GB"}}}, "cpu_fallback_gpu"),
    ({"cpu_fallback": {"image": "c", "resources": {"gpu_required": True}}}, "cpu_fallback_gpu"),
    ({"cpu_fallback": {"image": "c", "resources": {"gpu_model": "A100"}}}, "cpu_fallback_gpu"),
    ({"resources": {"cpu_limit": 1}}, "cpu_fallback_without_gpu"),
    ({"cpu_fallback": {"resources": {}}}, "missing"),
    ({"cpu_fallback": {"image": "c", "extra": 1}}, "extra_forbidden"),
    ({"health_check": None}, "cpu_fallback_needs_health_check"),
])
def test_a_malformed_fallback_is_refused(change: dict, error_type: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSpec.model_validate({**SPEC, **change})
    assert error_type in [e["type"] for e in info.value.errors()]


def test_a_copy_is_on_a_fallback_when_its_spec_asks_a_gpu_it_does_not_hold() -> None:
    """Decided from the copy: one left on the CPU after its spec's fallback was cleared (or by a partial
    rolling update) still reads as on a fallback, so the move back finds it."""
    spec = ServiceSpec.model_validate(SPEC)
    cleared = spec.model_copy(update={"cpu_fallback": None})
    for s in (spec, cleared, spec.model_dump(mode="json"), cleared.model_dump(mode="json")):
        assert on_fallback(s, []) and not on_fallback(s, ["0"])
    plain = ServiceSpec.model_validate({"name": "p", "image": "x"})
    assert not on_fallback(plain, []) and not on_fallback(plain.model_dump(mode="json"), [])


def test_the_fallback_runs_its_own_command_env_and_probe() -> None:
    """A CPU backend may start otherwise, need other settings, and not give a GPU model's golden answers:
    the fallback's probe is its own, none unless given."""
    probe = {"path": "/predict", "body": {"x": 1}, "expect": {"y": 2}}
    spec = ServiceSpec.model_validate({**SPEC, "command": ["serve", "--gpu"], "env": {"A": "1", "B": "1"},
                                       "probe": probe})
    variant = running_spec(spec, ())
    assert (variant.command, variant.env, variant.probe) == (["serve", "--gpu"], {"A": "1", "B": "1"}, None)
    own = {**SPEC["cpu_fallback"], "command": ["serve", "--cpu"], "env": {"B": "2"},  # type: ignore[dict-item]
           "probe": {**probe, "expect": {"y": 2.5}}}
    spec = ServiceSpec.model_validate({**SPEC, "env": {"A": "1", "B": "1"}, "probe": probe, "cpu_fallback": own})
    variant = running_spec(spec, ())
    assert variant.command == ["serve", "--cpu"] and variant.env == {"A": "1", "B": "2"}
    assert variant.probe is not None and variant.probe.expect == {"y": 2.5}
    # The main variant is unchanged; a fallback stored without these fields reads as before.
    assert running_spec(spec, ("0",)).env == {"A": "1", "B": "1"}
    assert set(ServiceSpec.model_validate(SPEC).model_dump(mode="json")["cpu_fallback"]) == {"image", "resources"}
