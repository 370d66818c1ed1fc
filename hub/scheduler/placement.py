"""Where a service should run (docs/ARCHITECTURE.md, Placement).

``place()`` is pure: it reads a snapshot of the controllers and the request and
returns a decision; it does no I/O and holds no state, so a test can build the
cluster from plain values and assert on the choice and on every rejection.

Order of work, after Nomad's scheduler:
1. feasibility: small predicates, cheap ones first; each failure is recorded as
   a ``Rejection`` naming the controller and why;
2. hardware match: GPU services only on ``gpu`` controllers, on GPUs of the model
   and VRAM they ask; CPU services on ``cpu`` controllers when one is feasible,
   otherwise on the others;
3. the smallest priority value among the candidates wins;
4. inside that tier, a controller that holds the service's image already (image
   locality: its heartbeats say so) before one that would pull it (one that
   reported no images is not known to lack it: it is not put behind);
5. then the controller whose containers-per-weight would be lowest after the
   placement takes it, so load follows weight (150 carries 1.5× of 100); ties
   break on the controller id.

``CandidateIndex`` makes the same choice as ``place()`` without a pass over every
controller: the eligible controllers sit in one heap per server type, ordered by
(priority, load after one more, id), which is the order ``_best`` picks by; a
placement pops entries until one passes every check (those that fail for this
request go back). When the one found lacks the image, image locality looks in the
same way at heaps of the controllers that hold it (one per image key, built the
first time from ``holders``, an index by image the caller keeps, else one built
from the views) and of those that reported no images, in the chosen one's tier.
It is still pure: the caller builds it from a snapshot and tells it what
it reserved.

CPU fallback: a GPU ask may carry a ``fallback`` request (its CPU variant's). Only when the GPU ask
places nowhere is the fallback placed, by the same rules, and the decision says so (``fallback``) with
the GPU ask's rejections (``gpu_rejections``); a GPU that fits always wins.

GPUs are held whole (``gpus_used``) or shared (``gpu_shared``: the VRAM budget
committed on each); never both. A shared ask (``gpu_memory``) goes best-fit: to
the GPU, across the tier, whose remaining budget is the smallest that still fits,
so whole GPUs stay free for large models; image locality breaks ties of fit.

Images are matched by ``image_key``: ``busybox``, ``busybox:latest`` and
``docker.io/library/busybox:latest`` are one image; a reference by digest
(``repo@sha256:…``) or by id (``sha256:…``) matches the controllers that report it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

GIB = 1024**3
NO_GPU_SHARES: Mapping[str, int] = MappingProxyType({})
NO_IMAGES: frozenset[str] = frozenset()
# ``Placement.reason`` when the chosen controller holds the image already.
IMAGE_PRESENT = "image present"
_DEFAULT_REGISTRIES = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")


def image_key(reference: str) -> str:
    """The one spelling of an image reference that placement compares: Docker Hub's registry and
    ``library/`` left out, ``:latest`` added when there is neither tag nor digest, a tag dropped beside a
    digest (the digest is what Docker pulls)."""
    if reference.startswith("sha256:"):
        return reference
    name, at, digest = reference.partition("@")
    for registry in _DEFAULT_REGISTRIES:
        if name.startswith(registry):
            name = name[len(registry):]
            break
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/"):]
    last = name.rsplit("/", 1)[-1]
    if at:
        return f"{name.rsplit(':', 1)[0] if ':' in last else name}@{digest}"
    return name if ":" in last else f"{name}:latest"


@dataclass(frozen=True)
class ControllerView:
    id: str
    server_type: str = "cpu"
    enabled: bool = True
    draining: bool = False
    healthy: bool = True
    priority: int = 1
    weight: int = 100
    max_containers: int = 100
    containers: int = 0
    cpu_cores: float = 0.0
    cpu_reserved: float = 0.0
    memory_total: int = 0
    memory_reserved: int = 0
    gpus: tuple[str, ...] = ()
    gpus_used: frozenset[str] = frozenset()
    # It runs golden-inference probes (its health report says so).
    golden_probes: bool = False
    # Per GPU of ``gpus``, in the same order: its model name and its VRAM in bytes (0: not reported).
    gpu_models: tuple[str, ...] = ()
    gpu_memory: tuple[int, ...] = ()
    # GPU index -> the VRAM budget its shared tenants hold; a GPU in it is not free for a whole ask.
    gpu_shared: Mapping[str, int] = field(default_factory=lambda: NO_GPU_SHARES)
    # The images it holds, each under every ``image_key`` it answers to (its heartbeats' report); None: it
    # reported none (polled, or its beats go to another hub replica), so it is never put behind a holder.
    images: frozenset[str] | None = None

    @property
    def free_gpus(self) -> list[str]:
        return [g for g in self.gpus if g not in self.gpus_used and not self.gpu_shared.get(g)]

    def gpu_model(self, i: int) -> str:
        return self.gpu_models[i] if i < len(self.gpu_models) else ""

    def gpu_total(self, i: int) -> int:
        return self.gpu_memory[i] if i < len(self.gpu_memory) else 0


@dataclass(frozen=True)
class PlacementRequest:
    memory: int = 0
    cpu: float = 0.0
    gpu_count: int = 0
    server_type: str | None = None
    exclude: frozenset[str] = frozenset()
    # The service has a golden-inference probe: only a controller that runs them may take it.
    golden_probe: bool = False
    # Only GPUs whose model name contains this (case-insensitively), with at least this much VRAM.
    gpu_model: str | None = None
    gpu_min_memory: int = 0
    # A VRAM budget on one shared GPU instead of whole GPUs (then gpu_count is 0).
    gpu_memory: int = 0
    # The service's image as ``image_key`` spells it: a controller holding it goes first within its tier.
    image: str | None = None

    @property
    def wants_gpu(self) -> bool:
        return self.gpu_count > 0 or self.gpu_memory > 0


@dataclass(frozen=True)
class Rejection:
    controller_id: str
    code: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"controller_id": self.controller_id, "code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class Placement:
    controller_id: str | None
    gpu_devices: tuple[str, ...] = ()
    rejections: tuple[Rejection, ...] = field(default_factory=tuple)
    # The VRAM budget taken on ``gpu_devices`` (one shared GPU); 0 when they are held whole.
    gpu_memory: int = 0
    # Placed as the CPU fallback (no GPU fitted): why the GPU ask placed nowhere.
    fallback: bool = False
    gpu_rejections: tuple[Rejection, ...] = ()
    # Neither placed: why the fallback placed nowhere either (``rejections`` are the GPU ask's).
    fallback_rejections: tuple[Rejection, ...] = ()
    # Why this controller among its tier, when more than load decided: "image present".
    reason: str = ""

    @property
    def placed(self) -> bool:
        return self.controller_id is not None


Check = Callable[[ControllerView, PlacementRequest], Rejection | None]


def _excluded(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if c.id in r.exclude:
        return Rejection(c.id, "EXCLUDED", "excluded for this placement (the service is moving off it)")
    return None


def _disabled(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if c.draining:
        return Rejection(c.id, "DRAINING", "controller is draining")
    if not c.enabled:
        return Rejection(c.id, "DISABLED", "controller is disabled")
    return None


def _unhealthy(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    return None if c.healthy else Rejection(c.id, "UNHEALTHY", "controller is not healthy")


def _server_type(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if r.server_type is not None and c.server_type != r.server_type:
        return Rejection(c.id, "SERVER_TYPE", f"service asks for a {r.server_type} server, this is {c.server_type}")
    if r.wants_gpu and c.server_type != "gpu":
        return Rejection(c.id, "SERVER_TYPE", f"service needs GPUs, this is a {c.server_type} server")
    return None


def _golden_probes(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if r.golden_probe and not c.golden_probes:
        return Rejection(c.id, "NO_GOLDEN_PROBES", "controller does not run golden probes")
    return None


def _container_cap(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if c.containers >= c.max_containers:
        return Rejection(c.id, "MAX_CONTAINERS", f"at MAX_CONTAINERS ({c.containers}/{c.max_containers})")
    return None


def _kind(c: ControllerView, r: PlacementRequest) -> tuple[list[int], Rejection | None]:
    """The positions of ``c.gpus`` of the model and VRAM asked, or why there are none."""
    model = r.gpu_model.lower() if r.gpu_model else None
    matching = [i for i in range(len(c.gpus)) if model is None or model in c.gpu_model(i).lower()]
    if not matching:
        have = sorted(set(c.gpu_models)) or ["none reported"]
        return [], Rejection(c.id, "GPU_MODEL", f"no {r.gpu_model} GPU (has {', '.join(have)})")
    if r.gpu_min_memory:
        matching = [i for i in matching if c.gpu_total(i) >= r.gpu_min_memory]
        if not matching:
            return [], Rejection(c.id, "GPU_MEMORY", f"no GPU{' ' + r.gpu_model if r.gpu_model else ''} with "
                                                     f"{r.gpu_min_memory / GIB:.1f} GiB of VRAM")
    return matching, None


def _whole_gpus(c: ControllerView, r: PlacementRequest) -> list[str]:
    """The free GPUs (no whole holder, no shared tenant) of the model and VRAM asked, in inventory order."""
    matching, _ = _kind(c, r)
    return [c.gpus[i] for i in matching if c.gpus[i] not in c.gpus_used and not c.gpu_shared.get(c.gpus[i])]


def _shared_fit(c: ControllerView, r: PlacementRequest) -> tuple[int, str] | None:
    """Best fit for a shared ask: (remaining budget after it, GPU) for the GPU left with the least, or None."""
    matching, _ = _kind(c, r)
    best: tuple[int, str] | None = None
    for i in matching:
        g = c.gpus[i]
        if g in c.gpus_used:
            continue
        left = c.gpu_total(i) - c.gpu_shared.get(g, 0) - r.gpu_memory
        if left >= 0 and (best is None or (left, g) < best):
            best = (left, g)
    return best


def _gpus(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if not r.wants_gpu:
        return None
    if r.gpu_model or r.gpu_min_memory:
        _, rejection = _kind(c, r)
        if rejection is not None:
            return rejection
    if r.gpu_memory:
        if _shared_fit(c, r) is None:
            return Rejection(c.id, "NO_SHARED_GPU",
                             f"no GPU not held whole with {r.gpu_memory / GIB:.1f} GiB of VRAM budget left")
        return None
    free = len(_whole_gpus(c, r)) if (r.gpu_model or r.gpu_min_memory or c.gpu_shared) else len(c.free_gpus)
    if r.gpu_count > free:
        return Rejection(c.id, "GPUS", f"needs {r.gpu_count} free GPU(s), has {free} of {len(c.gpus)}")
    return None


def _memory(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if r.memory and c.memory_total and c.memory_reserved + r.memory > c.memory_total:
        free = max(c.memory_total - c.memory_reserved, 0)
        return Rejection(
            c.id, "MEMORY", f"needs {r.memory / GIB:.2f} GiB of memory, {free / GIB:.2f} GiB unreserved"
        )
    return None


def _cpu(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    if r.cpu and c.cpu_cores and c.cpu_reserved + r.cpu > c.cpu_cores + 1e-9:
        free = max(c.cpu_cores - c.cpu_reserved, 0.0)
        return Rejection(c.id, "CPU", f"needs {r.cpu:g} CPUs, {free:g} of {c.cpu_cores:g} unreserved")
    return None


# Cheap checks first; the first failing one is the controller's reason.
CHECKS: tuple[Check, ...] = (_excluded, _disabled, _unhealthy, _server_type, _golden_probes, _container_cap, _gpus,
                             _memory, _cpu)


def feasibility(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    for check in CHECKS:
        rejection = check(c, r)
        if rejection is not None:
            return rejection
    return None


def _load_after(c: ControllerView) -> float:
    return (c.containers + 1) / c.weight


def _lacks(c: ControllerView, request: PlacementRequest | None) -> bool:
    """Whether placing there would pull the image, as far as its report says (False when the request names
    none, or the controller reported no images: it is not known to lack it)."""
    return (request is not None and request.image is not None and c.images is not None
            and request.image not in c.images)


def _holds(c: ControllerView, request: PlacementRequest) -> bool:
    return request.image is not None and c.images is not None and request.image in c.images


def _best(candidates: Sequence[ControllerView], request: PlacementRequest | None = None) -> ControllerView:
    top = min(c.priority for c in candidates)
    tier = [c for c in candidates if c.priority == top]
    if request is not None and request.gpu_memory:
        # Packing beats spreading for shared GPUs: the tightest fit in the tier, then the image, then load.
        def fit(c: ControllerView) -> int:
            found = _shared_fit(c, request)
            return found[0] if found is not None else 1 << 62
        return min(tier, key=lambda c: (fit(c), _lacks(c, request), _load_after(c), c.id))
    return min(tier, key=lambda c: (_lacks(c, request), _load_after(c), c.id))


def _decision(chosen: ControllerView, request: PlacementRequest, rejections: tuple[Rejection, ...]) -> Placement:
    reason = IMAGE_PRESENT if request.image is not None and _holds(chosen, request) else ""
    if request.gpu_memory:
        found = _shared_fit(chosen, request)
        assert found is not None
        return Placement(chosen.id, (found[1],), rejections, gpu_memory=request.gpu_memory, reason=reason)
    if request.gpu_model or request.gpu_min_memory or chosen.gpu_shared:
        gpus = tuple(_whole_gpus(chosen, request)[: request.gpu_count])
    else:
        gpus = tuple(chosen.free_gpus[: request.gpu_count])
    return Placement(chosen.id, gpus, rejections, reason=reason)


def or_fallback(main: Placement, request: PlacementRequest, fallback: PlacementRequest | None,
                place_fallback: Callable[[PlacementRequest], Placement]) -> Placement:
    """The CPU fallback rule: ``main`` (the GPU ask's decision) when it placed, or when there is no
    fallback; else the fallback's decision (``place_fallback``), marked as such with the GPU rejections."""
    if main.placed or fallback is None or not request.wants_gpu:
        return main
    cpu = place_fallback(fallback)
    if cpu.placed:
        return replace(cpu, fallback=True, gpu_rejections=main.rejections)
    return replace(main, fallback_rejections=cpu.rejections)


def place(controllers: Iterable[ControllerView], request: PlacementRequest,
          fallback: PlacementRequest | None = None) -> Placement:
    """Where ``request`` goes; with ``fallback`` (a GPU ask's CPU variant), where that goes when no GPU fits."""
    if fallback is None:
        return _place(controllers, request)
    views = list(controllers)
    return or_fallback(_place(views, request), request, fallback, lambda cpu: _place(views, cpu))


def _place(controllers: Iterable[ControllerView], request: PlacementRequest) -> Placement:
    rejections: list[Rejection] = []
    feasible: list[ControllerView] = []
    for c in sorted(controllers, key=lambda c: c.id):
        rejection = feasibility(c, request)
        if rejection is None:
            feasible.append(c)
        else:
            rejections.append(rejection)
    if not feasible:
        return Placement(None, (), tuple(rejections))
    if not request.wants_gpu and request.server_type is None:
        preferred = [c for c in feasible if c.server_type == "cpu"]
        if preferred:
            rejections.extend(
                Rejection(c.id, "NOT_PREFERRED", "CPU services prefer cpu servers and one is available")
                for c in feasible
                if c.server_type != "cpu"
            )
            feasible = preferred
    return _decision(_best(feasible, request), request, tuple(rejections))


def _eligible(c: ControllerView) -> bool:
    """Passes the checks that do not depend on the request (disabled, draining, unhealthy)."""
    return c.enabled and not c.draining and c.healthy


def _key(c: ControllerView) -> tuple[int, float, str]:
    return (c.priority, _load_after(c), c.id)


# A heap entry taken off while looking, and the heap it goes back to.
Popped = tuple[list[tuple[int, float, str]], tuple[int, float, str]]


class CandidateIndex:
    """The controllers of a snapshot, indexed so that a placement costs O(log n) rather than a pass over all.

    ``place()`` answers exactly as the module's ``place()`` would on ``views()``
    (a failed placement is handed to it, for the rejections). ``reserve()`` and
    ``release()`` change one controller's counts after a placement or its undoing.
    """

    def __init__(self, views: Iterable[ControllerView],
                 holders: Callable[[str], Iterable[str]] | None = None) -> None:
        self._views: dict[str, ControllerView] = {}
        self._heaps: dict[str, list[tuple[int, float, str]]] = {}
        # The same for the controllers that reported no images (as good as a holder for locality): where one
        # is found when the heaps' best lacks the image. Built the first time that happens (a fleet that
        # reported all or none of its images never needs it).
        self._unreported: dict[str, list[tuple[int, float, str]]] | None = None
        # Per image key, the same for the controllers holding it: built the first time a placement's best
        # lacks that image, kept up by ``_update`` and ``set_images`` after.
        self._holding_heaps: dict[str, dict[str, list[tuple[int, float, str]]]] = {}
        for v in views:
            self._views[v.id] = v
            if _eligible(v):
                self._heaps.setdefault(v.server_type, []).append(_key(v))
        # The ids of the controllers holding an image (by ``image_key``); their views' ``images`` decide. Without
        # one from the caller, built from the views when first needed.
        self._holders = holders
        self._own_holders = holders is None
        for heap in self._heaps.values():
            heapq.heapify(heap)
        # The controllers with GPUs: where a shared-GPU ask looks.
        self._gpu_ids = [cid for cid, v in self._views.items() if v.gpus]

    def views(self) -> list[ControllerView]:
        return list(self._views.values())

    def get(self, controller_id: str) -> ControllerView | None:
        return self._views.get(controller_id)

    def __len__(self) -> int:
        return len(self._views)

    def _first(self, server_type: str, request: PlacementRequest, popped: list[Popped],
               heaps: dict[str, list[tuple[int, float, str]]] | None = None,
               member: Callable[[ControllerView], bool] | None = None) -> ControllerView | None:
        """The best controller of one type that passes every check; what was looked at goes to ``popped``.
        ``member``: whether a controller still belongs in ``heaps`` (one that left it is dropped)."""
        heaps = self._heaps if heaps is None else heaps
        heap = heaps.get(server_type)
        while heap:
            key = heapq.heappop(heap)
            c = self._views.get(key[2])
            if c is None or _key(c) != key or not _eligible(c) or (member is not None and not member(c)):
                continue  # an entry from before a reserve/release: its current one is elsewhere in the heap
            popped.append((heap, key))
            if feasibility(c, request) is None:
                return c
        return None

    def _holding_heap(self, image: str) -> dict[str, list[tuple[int, float, str]]]:
        heaps = self._holding_heaps.get(image)
        if heaps is None:
            if self._holders is None:
                self._holders = _holders_of(self._views.values())
            heaps = {}
            for cid in self._holders(image):
                c = self._views.get(cid)
                if c is not None and c.images is not None and image in c.images and _eligible(c):
                    heaps.setdefault(c.server_type, []).append(_key(c))
            for heap in heaps.values():
                heapq.heapify(heap)
            self._holding_heaps[image] = heaps
        return heaps

    def _holding(self, chosen: ControllerView, types: list[str], request: PlacementRequest,
                 popped: list[Popped]) -> ControllerView | None:
        """The best controller of ``chosen``'s tier (its priority, one of ``types``) that holds the image, or
        reported none, and passes every check: no feasible controller has a smaller priority than the heaps'
        best, so only its tier can hold a better one. A look at the heaps of the image's holders and of the
        unreported controllers, not at the tier."""
        image = request.image
        if image is None:
            return None
        if self._unreported is None:
            self._unreported = {}
            for v in self._views.values():
                if v.images is None and _eligible(v):
                    self._unreported.setdefault(v.server_type, []).append(_key(v))
            for heap in self._unreported.values():
                heapq.heapify(heap)
        found: list[ControllerView] = []
        for heaps, member in ((self._unreported, _unreported),
                              (self._holding_heap(image), lambda c: c.images is not None and image in c.images)):
            found.extend(c for t in types if (c := self._first(t, request, popped, heaps, member)) is not None
                         and c.priority == chosen.priority)
        return min(found, key=_key) if found else None

    def place(self, request: PlacementRequest, fallback: PlacementRequest | None = None) -> Placement:
        if fallback is not None:
            return or_fallback(self.place(request), request, fallback, self.place)
        if request.gpu_memory:
            # Best fit is not the heaps' order: one pass over the GPU controllers (all of them for the
            # rejections when none fits).
            shared = place((self._views[cid] for cid in self._gpu_ids), request)
            return replace(shared, rejections=()) if shared.placed else place(self._views.values(), request)
        if request.gpu_count > 0:
            groups = [["gpu"]] if request.server_type in (None, "gpu") else []
        elif request.server_type is not None:
            groups = [[request.server_type]]
        else:
            groups = [["cpu"], sorted(t for t in self._heaps if t != "cpu")]
        popped: list[Popped] = []
        chosen: ControllerView | None = None
        try:
            for types in groups:
                found = [c for t in types if (c := self._first(t, request, popped)) is not None]
                if found:
                    chosen = min(found, key=_key)
                    if request.image is not None and _lacks(chosen, request):
                        chosen = self._holding(chosen, types, request, popped) or chosen
                    break
        finally:
            for heap, key in popped:
                heapq.heappush(heap, key)
        if chosen is None:
            return place(self._views.values(), request)
        return _decision(chosen, request, ())

    def place_on(self, request: PlacementRequest, controller_id: str, instead_of: str) -> Placement | None:
        """``request`` on ``controller_id`` (where a job's inputs already are, say), if it passes every check and
        stands where ``instead_of``, this index's own choice, does: its server type and priority tier, and the
        image when the choice holds it (a pull costs more than a fetch of inputs, as a rule)."""
        c, chosen = self._views.get(controller_id), self._views.get(instead_of)
        if (c is None or chosen is None or (c.priority, c.server_type) != (chosen.priority, chosen.server_type)
                or (_lacks(c, request) and not _lacks(chosen, request))
                or not _eligible(c) or feasibility(c, request) is not None):
            return None
        return _decision(c, request, ())

    def _update(self, c: ControllerView) -> None:
        self._views[c.id] = c
        if _eligible(c):
            key = _key(c)
            heapq.heappush(self._heaps.setdefault(c.server_type, []), key)
            self._push_images(c, key)

    def _push_images(self, c: ControllerView, key: tuple[int, float, str]) -> None:
        """Its current entry in the heaps of the images it holds (those built), or of the unreported."""
        if c.images is None:
            if self._unreported is not None:
                heapq.heappush(self._unreported.setdefault(c.server_type, []), key)
            return
        built = self._holding_heaps
        for image in (built.keys() & c.images if len(built) < len(c.images) else c.images & built.keys()):
            heapq.heappush(built[image].setdefault(c.server_type, []), key)

    def set_images(self, controller_id: str, images: frozenset[str] | None) -> None:
        """What a controller holds changed (its heartbeat said so): its view takes the new set in place."""
        c = self._views.get(controller_id)
        if c is None or c.images == images:
            return
        c = replace(c, images=images)
        self._views[controller_id] = c
        if self._own_holders:
            self._holders = None  # built from the views: built again when next needed
        if _eligible(c):
            self._push_images(c, _key(c))

    def reserve(self, controller_id: str, memory: int, cpu: float, gpus: Iterable[str], gpu_memory: int = 0) -> None:
        """Count a placement; with ``gpu_memory`` its GPUs are shared (that budget on each), else held whole."""
        c = self._views.get(controller_id)
        if c is not None:
            if gpu_memory:
                shared, used = _shares(c.gpu_shared, gpus, gpu_memory), c.gpus_used
            else:
                shared, used = c.gpu_shared, c.gpus_used | frozenset(gpus)
            self._update(replace(c, containers=c.containers + 1, memory_reserved=c.memory_reserved + memory,
                                 cpu_reserved=c.cpu_reserved + cpu, gpus_used=used, gpu_shared=shared))

    def release(self, controller_id: str, memory: int, cpu: float, gpus: Iterable[str], gpu_memory: int = 0) -> None:
        c = self._views.get(controller_id)
        if c is not None:
            if gpu_memory:
                shared, used = _shares(c.gpu_shared, gpus, -gpu_memory), c.gpus_used
            else:
                shared, used = c.gpu_shared, c.gpus_used - frozenset(gpus)
            self._update(replace(c, containers=max(c.containers - 1, 0),
                                 memory_reserved=max(c.memory_reserved - memory, 0),
                                 cpu_reserved=max(c.cpu_reserved - cpu, 0.0), gpus_used=used, gpu_shared=shared))

    def forget(self, controller_id: str) -> None:
        """Take a controller out of placement until the next snapshot (the database says it is unfit)."""
        c = self._views.get(controller_id)
        if c is not None:
            self._views[controller_id] = replace(c, healthy=False)


def _unreported(c: ControllerView) -> bool:
    return c.images is None


def _holders_of(views: Iterable[ControllerView]) -> Callable[[str], Iterable[str]]:
    by_image: dict[str, list[str]] = {}
    for v in views:
        for key in v.images or ():
            by_image.setdefault(key, []).append(v.id)
    return lambda key: by_image.get(key, ())


def _shares(shared: Mapping[str, int], gpus: Iterable[str], delta: int) -> Mapping[str, int]:
    """``shared`` with ``delta`` bytes of budget added on each of ``gpus`` (a GPU at 0 leaves it)."""
    out = dict(shared)
    for g in gpus:
        left = out.get(g, 0) + delta
        if left > 0:
            out[g] = left
        else:
            out.pop(g, None)
    return MappingProxyType(out)
