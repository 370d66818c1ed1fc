"""The prefetch planner, pure: which services are prepared and onto which controllers (their next failover
targets, as placement picks them with the service's own controllers excluded)."""

from functools import partial

import pytest

from hub.scheduler import CandidateIndex, ControllerView, PlacementRequest, place
from hub.scheduler.placement import GIB, image_key
from hub.scheduler.prefetch import PrefetchCandidate, PrefetchTarget, plan_prefetch, wants_prefetch

REF = "127.0.0.1:5000/big:1"
IMG = image_key(REF)


def node(id: str, *, has: bool = False, **kw) -> ControllerView:
    return ControllerView(id=id, cpu_cores=16.0, memory_total=64 * GIB,
                          images=frozenset({IMG}) if has else frozenset(), **kw)



def service(sid: str, on: set[str], *, prefetch: bool = True, **kw) -> PrefetchCandidate:
    return PrefetchCandidate(sid, PlacementRequest(image=IMG, exclude=frozenset(on), **kw), REF, prefetch)


FLEET = [node("a", containers=1), node("b", containers=3), node("c", containers=2), node("d", priority=2)]


@pytest.mark.parametrize(("name", "fleet", "candidates", "kw", "expected"), [
    ("the next failover target: the least loaded but for the service's own",
     FLEET, [service("s", {"a"})], {}, [("s", "c", False)]),
    ("two targets: the second excludes the first",
     FLEET, [service("s", {"a"})], {"targets": 2}, [("s", "c", False), ("s", "b", False)]),
    ("a controller holding the image is the target, marked present (nothing to pull)",
     [*FLEET[:2], node("c", containers=2), node("e", has=True, containers=9)], [service("s", {"a"})], {},
     [("s", "e", True)]),
    ("a service without prefetch and a small image: none",
     FLEET, [service("s", {"a"}, prefetch=False)], {"min_image_bytes": 10 * GIB}, []),
    ("a service without prefetch whose image is at least the minimum",
     FLEET, [service("s", {"a"}, prefetch=False)], {"min_image_bytes": 5 * GIB, "image_size": lambda _: 6 * GIB},
     [("s", "c", False)]),
    ("the size rule off (0): only prefetch services",
     FLEET, [service("s", {"a"}, prefetch=False)], {"min_image_bytes": 0, "image_size": lambda _: 60 * GIB}, []),
    ("every replica's controller excluded; a lower tier when the first is all taken",
     FLEET, [service("s", {"a", "b", "c"})], {"targets": 2}, [("s", "d", False)]),
    ("nowhere to go: no target",
     [node("a")], [service("s", {"a"})], {}, []),
    ("feasibility counts: the target has the memory",
     [node("a"), node("b", memory_reserved=63 * GIB), node("c", containers=5)],
     [service("s", {"a"}, memory=2 * GIB)], {}, [("s", "c", False)]),
])
def test_plan(name, fleet, candidates, kw, expected):
    holders = {v.id for v in fleet if IMG in (v.images or ())}
    index = CandidateIndex(fleet, lambda key: holders if key == IMG else ())
    for placer in (partial(place, fleet), index.place):
        plan = plan_prefetch(candidates, placer, **kw)
        assert [(t.service_id, t.controller_id, t.image_present) for t in plan] == expected, name
        assert all(isinstance(t, PrefetchTarget) and t.image_ref == REF for t in plan)


def test_wants_prefetch():
    assert wants_prefetch(True, 0, 0)
    assert not wants_prefetch(False, 10 * GIB, 0)
    assert wants_prefetch(False, GIB, GIB) and not wants_prefetch(False, GIB - 1, GIB)
