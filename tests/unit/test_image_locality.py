"""Image locality in placement, on the pure scheduler: a table of fleets and requests, each answered the same by
``place()`` and by ``CandidateIndex`` (the many-replica path), with the reason; image references as keys."""

import random
from dataclasses import replace

import pytest

from hub.scheduler import CandidateIndex, ControllerView, PlacementRequest, place
from hub.scheduler.placement import GIB, image_key
from hub.scheduler.snapshot import PlacementCache
from hub.services.locality import ImageSets
from mmanager.wire import HeldImage

IMG = image_key("127.0.0.1:5000/model:1")


def node(id: str, *, has: bool = False, reported: bool = True, **kw) -> ControllerView:
    images = (frozenset({IMG}) if has else frozenset()) if reported else None
    base = dict(server_type="cpu", cpu_cores=16.0, memory_total=64 * GIB, images=images)
    base.update(kw)
    return ControllerView(id=id, **base)


def gpu(id: str, *, has: bool = False, **kw) -> ControllerView:
    return node(id, has=has, server_type="gpu", gpus=("0", "1"), gpu_models=("L4", "L4"),
                gpu_memory=(24 * GIB, 24 * GIB), **kw)


def holders_of(views: list[ControllerView]):
    index: dict[str, set[str]] = {}
    for v in views:
        for key in v.images or ():
            index.setdefault(key, set()).add(v.id)
    return lambda key: index.get(key, ())


CASES = [
    # (name, fleet, request, chosen, reason)
    ("the holder wins over a less loaded one in the tier",
     [node("a", containers=0), node("b", has=True, containers=5)], PlacementRequest(image=IMG), "b", "image present"),
    ("no holder: load decides as before",
     [node("a", containers=3), node("b", containers=1)], PlacementRequest(image=IMG), "b", ""),
    ("no image asked: load decides",
     [node("a", containers=0), node("b", has=True, containers=5)], PlacementRequest(), "a", ""),
    ("priority comes first: a holder in a worse tier loses",
     [node("a", priority=1), node("b", has=True, priority=2)], PlacementRequest(image=IMG), "a", ""),
    ("feasibility comes first: a full holder is not chosen",
     [node("a"), node("b", has=True, containers=3, max_containers=3)], PlacementRequest(image=IMG), "a", ""),
    ("a holder without the memory is not chosen",
     [node("a"), node("b", has=True, memory_reserved=63 * GIB)], PlacementRequest(image=IMG, memory=2 * GIB), "a", ""),
    ("an excluded holder (the one the service leaves) is not chosen",
     [node("a"), node("b", has=True)], PlacementRequest(image=IMG, exclude=frozenset({"b"})), "a", ""),
    ("a draining holder is not chosen",
     [node("a"), node("b", has=True, draining=True)], PlacementRequest(image=IMG), "a", ""),
    ("among holders, load decides",
     [node("a", has=True, containers=4), node("b", has=True, containers=2), node("c")], PlacementRequest(image=IMG),
     "b", "image present"),
    ("among holders, weight counts in the load",
     [node("a", has=True, containers=2, weight=300), node("b", has=True, containers=1)], PlacementRequest(image=IMG),
     "a", "image present"),
    ("a CPU service stays on cpu servers though an edge server holds the image",
     [node("a"), node("e", has=True, server_type="edge")], PlacementRequest(image=IMG), "a", ""),
    ("with no cpu server feasible, the holder among the others wins",
     [node("a", max_containers=0), node("e1", server_type="edge"), node("e2", has=True, server_type="edge",
                                                                        containers=4)],
     PlacementRequest(image=IMG), "e2", "image present"),
    ("GPU services: the holder among GPU servers with free GPUs",
     [gpu("g1"), gpu("g2", has=True, containers=3), node("c", has=True)], PlacementRequest(image=IMG, gpu_count=1),
     "g2", "image present"),
    ("GPU services: a holder without free GPUs is not chosen",
     [gpu("g1"), gpu("g2", has=True, gpus_used=frozenset({"0", "1"}))], PlacementRequest(image=IMG, gpu_count=1),
     "g1", ""),
    ("a controller that reported no images is not put behind a holder: load decides",
     [node("a", reported=False, containers=0), node("b", has=True, containers=5)], PlacementRequest(image=IMG),
     "a", ""),
    ("an unreported controller beats one known to lack the image",
     [node("a", containers=0), node("b", reported=False, containers=3), node("c", containers=1)],
     PlacementRequest(image=IMG), "b", ""),
    ("between a holder and an unreported one, load decides",
     [node("a", has=True, containers=4), node("b", reported=False, containers=3), node("c", containers=0)],
     PlacementRequest(image=IMG), "b", ""),
    ("shared GPUs: best fit first, the image breaks ties of fit",
     [gpu("g1"), gpu("g2", has=True, containers=2)], PlacementRequest(image=IMG, gpu_memory=8 * GIB), "g2",
     "image present"),
    ("shared GPUs: a tighter fit beats the image",
     [gpu("g1", gpu_shared={"0": 8 * GIB}), gpu("g2", has=True)], PlacementRequest(image=IMG, gpu_memory=8 * GIB),
     "g1", ""),
]


@pytest.mark.parametrize(("name", "fleet", "request_", "chosen", "reason"), CASES, ids=[c[0] for c in CASES])
def test_locality_table(name, fleet, request_, chosen, reason):
    for decision in (place(fleet, request_), CandidateIndex(fleet, holders_of(fleet)).place(request_),
                     CandidateIndex(fleet).place(request_)):
        assert decision.controller_id == chosen, name
        assert decision.reason == reason, name


def random_request(rng: random.Random, fleet: list[ControllerView]) -> PlacementRequest:
    kind = rng.choice(("cpu", "cpu", "gpu", "typed"))
    exclude = frozenset(rng.sample([v.id for v in fleet], rng.choice((0, 0, 1, 2))))
    if kind == "gpu":
        return PlacementRequest(image=IMG, memory=GIB, gpu_count=rng.choice((1, 2)), exclude=exclude)
    server_type = rng.choice(("cpu", "edge", "gpu")) if kind == "typed" else None
    return PlacementRequest(image=IMG, memory=GIB, server_type=server_type, exclude=exclude)


@pytest.mark.parametrize("holders", ["given", "built"])
def test_index_agrees_with_place_on_random_fleets(holders):
    """The index's fast path (heaps, then the heaps of the image's holders) chooses as ``place()`` does,
    placement after placement, on fleets of mixed tiers, types, GPUs, loads and holders, with requests by type,
    for GPUs and with exclusions, while controllers' image sets change between placements."""
    rng = random.Random(25)
    for _ in range(300):
        fleet = []
        for i in range(10):
            kw = dict(has=rng.random() < 0.3, reported=rng.random() < 0.8, priority=rng.choice((1, 1, 2)),
                      containers=rng.randrange(6), max_containers=rng.randrange(3, 9), weight=rng.choice((100, 150)))
            fleet.append(gpu(f"n{i}", **kw) if rng.random() < 0.3
                         else node(f"n{i}", server_type=rng.choice(("cpu", "cpu", "edge")), **kw))
        views = {v.id: v for v in fleet}

        def live(key: str, views=views) -> list[str]:
            # As ImageSets.holders: the current sets, not the snapshot's.
            return [cid for cid, v in views.items() if v.images is not None and key in v.images]

        index = CandidateIndex(fleet, live if holders == "given" else None)
        for _ in range(12):
            if rng.random() < 0.3:
                # A heartbeat changed one controller's set (as PlacementCache.images_changed passes on).
                v = rng.choice(list(views.values()))
                images = rng.choice((None, frozenset(), frozenset({IMG})))
                views[v.id] = replace(v, images=images)
                index.set_images(v.id, images)
            request_ = random_request(rng, fleet)
            want, got = place(views.values(), request_), index.place(request_)
            assert (got.controller_id, got.reason, got.gpu_devices) == (want.controller_id, want.reason,
                                                                        want.gpu_devices)
            if not want.placed:
                continue
            v = views[want.controller_id]
            views[v.id] = replace(v, containers=v.containers + 1, memory_reserved=v.memory_reserved + GIB,
                                  gpus_used=v.gpus_used | frozenset(want.gpu_devices))
            index.reserve(v.id, GIB, 0.0, want.gpu_devices)


def test_image_key_spellings():
    assert image_key("busybox") == image_key("busybox:latest") == image_key("docker.io/library/busybox:latest")
    assert image_key("docker.io/me/x:1") == "me/x:1"
    assert image_key("127.0.0.1:5000/model") == "127.0.0.1:5000/model:latest"
    assert image_key("127.0.0.1:5000/model:1@sha256:ab") == "127.0.0.1:5000/model@sha256:ab"
    assert image_key("sha256:ab") == "sha256:ab"


def test_image_sets_index_by_every_name():
    sets = ImageSets()
    sets.update("a", "v1", [HeldImage(id="sha256:1", tags=["127.0.0.1:5000/model:1"],
                                      digests=["127.0.0.1:5000/model@sha256:d"], size=500)])
    sets.update("b", "v2", [HeldImage(id="sha256:1", tags=["127.0.0.1:5000/model:1"], size=500)])
    assert set(sets.holders(IMG)) == {"a", "b"}
    assert set(sets.holders(image_key("127.0.0.1:5000/model@sha256:d"))) == {"a"}
    assert sets.size(IMG) == 500 and sets.version("a") == "v1"
    sets.update("a", "v3", [])
    assert set(sets.holders(IMG)) == {"b"} and sets.keys("a") == frozenset()
    sets.forget("b")
    assert list(sets.holders(IMG)) == [] and sets.size(IMG) == 0 and sets.version("b") is None
    # Unreported is not empty: nothing is added to a controller that never listed its images.
    assert sets.keys("b") is None and not sets.add("b", {IMG}, 1) and sets.keys("b") is None
    assert sets.add("a", {IMG}, 7) and set(sets.holders(IMG)) == {"a"} and sets.size(IMG) == 7


async def test_an_image_change_reaches_the_cached_view_without_a_snapshot(monkeypatch):
    """A heartbeat with a new image set updates that controller's view in the cached index in place: the create
    path that follows takes no snapshot of the database for it."""
    sets = ImageSets()
    cache = PlacementCache(None, images=sets)  # type: ignore[arg-type]
    sets.on_change = cache.images_changed
    loads = 0

    async def load_views(db, images):
        nonlocal loads
        loads += 1
        return [node("a"), replace(node("b", containers=3), images=images("b") if images else None)], {}

    monkeypatch.setattr("hub.scheduler.snapshot.load_views", load_views)
    sets.update("b", "v1", [])
    assert (await cache.index()).place(PlacementRequest(image=IMG)).controller_id == "a"
    sets.update("b", "v2", [HeldImage(id="sha256:1", tags=["127.0.0.1:5000/model:1"])])
    decision = (await cache.index()).place(PlacementRequest(image=IMG))
    assert (decision.controller_id, decision.reason, loads) == ("b", "image present", 1)
    sets.update("b", "v3", [])
    decision = (await cache.index()).place(PlacementRequest(image=IMG))
    assert (decision.controller_id, loads) == ("a", 1)


def test_a_replica_drops_sets_it_can_no_longer_vouch_for():
    now = [0.0]
    sets = ImageSets(clock=lambda: now[0])
    sets.grace = 10.0
    held = [HeldImage(id="sha256:1", tags=["127.0.0.1:5000/model:1"])]
    sets.beat("a", "v1", held)
    assert sets.keys("a") is not None and IMG in sets.keys("a")
    # Its beats went elsewhere for longer than the grace: not known to hold (nor lack) anything here.
    now[0] = 11.0
    assert sets.keys("a") is None and not sets.has("a", IMG)
    # It beats here again with the version held: the set counts again.
    sets.beat("a", "v1", None)
    assert sets.has("a", IMG) and sets.version("a") == "v1"
    # A beat without a version (its listing is off, or was refused) drops it.
    sets.beat("a", None, None)
    assert sets.keys("a") is None and sets.version("a") is None and list(sets.holders(IMG)) == []
    # So does one naming another version than the one held (it changed while beating to another replica).
    sets.beat("a", "v2", held)
    sets.beat("a", "v3", None)
    assert sets.keys("a") is None and sets.version("a") is None
    # A controller gone from the database loses its set; one that beat here since the snapshot began keeps it.
    sets.beat("a", "v2", held)
    now[0] = 20.0
    sets.beat("b", "v1", held)
    sets.retain({"a"}, before=15.0)
    assert sets.keys("b") is not None
    sets.retain({"a"}, before=21.0)
    assert sets.keys("b") is None and set(sets.holders(IMG)) == {"a"}


@pytest.mark.parametrize(("name", "fleet", "request_", "near", "chosen"), [
    ("the inputs' controller wins in the chosen one's tier", [node("a"), node("b", containers=3)],
     PlacementRequest(), "b", "b"),
    ("a full one is not taken", [node("a"), node("b", containers=3, max_containers=3)], PlacementRequest(), "b", None),
    ("nor one in a worse tier", [node("a"), node("b", priority=2)], PlacementRequest(), "b", None),
    ("nor one of another server type", [node("a"), gpu("b")], PlacementRequest(), "b", None),
    ("nor a draining one", [node("a"), node("b", draining=True)], PlacementRequest(), "b", None),
    ("nor an unknown one", [node("a")], PlacementRequest(), "gone", None),
    ("nor one without the image the choice holds", [node("a", has=True), node("b")], PlacementRequest(image=IMG),
     "b", None),
    ("where the choice would pull the image too, it may move", [node("a"), node("b", containers=3)], PlacementRequest(image=IMG),
     "b", "b"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_place_on_takes_the_inputs_controller_only_where_the_choice_stands(name, fleet, request_, near,
                                                                           chosen) -> None:
    index = CandidateIndex(fleet)
    choice = index.place(request_)
    assert choice.controller_id == "a", name
    found = index.place_on(request_, near, choice.controller_id)
    assert (found.controller_id if found else None) == chosen, name
