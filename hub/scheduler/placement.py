"""Where a service should run (docs/ARCHITECTURE.md, Placement).

``place()`` is pure: it reads a snapshot of the controllers and the request and
returns a decision; it does no I/O and holds no state, so a test can build the
cluster from plain values and assert on the choice and on every rejection.

Order of work, after Nomad's scheduler:
1. feasibility: small predicates, cheap ones first; each failure is recorded as
   a ``Rejection`` naming the controller and why;
2. hardware match: GPU services only on ``gpu`` controllers; CPU services on
   ``cpu`` controllers when one is feasible, otherwise on the others;
3. the smallest priority value among the candidates wins;
4. inside that tier, the controller whose containers-per-weight would be lowest
   after the placement takes it, so load follows weight (150 carries 1.5× of
   100); ties break on the controller id.

``CandidateIndex`` makes the same choice as ``place()`` without a pass over every
controller: the eligible controllers sit in one heap per server type, ordered by
(priority, load after one more, id), which is the order ``_best`` picks by; a
placement pops entries until one passes every check (those that fail for this
request go back). It is still pure: the caller builds it from a snapshot and
tells it what it reserved.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

GIB = 1024**3


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

    @property
    def free_gpus(self) -> list[str]:
        return [g for g in self.gpus if g not in self.gpus_used]


@dataclass(frozen=True)
class PlacementRequest:
    memory: int = 0
    cpu: float = 0.0
    gpu_count: int = 0
    server_type: str | None = None
    exclude: frozenset[str] = frozenset()
    # The service has a golden-inference probe: only a controller that runs them may take it.
    golden_probe: bool = False


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
    if r.gpu_count > 0 and c.server_type != "gpu":
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


def _gpus(c: ControllerView, r: PlacementRequest) -> Rejection | None:
    free = len(c.free_gpus)
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


def _best(candidates: Sequence[ControllerView]) -> ControllerView:
    top = min(c.priority for c in candidates)
    tier = [c for c in candidates if c.priority == top]
    return min(tier, key=lambda c: (_load_after(c), c.id))


def place(controllers: Iterable[ControllerView], request: PlacementRequest) -> Placement:
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
    if request.gpu_count == 0 and request.server_type is None:
        preferred = [c for c in feasible if c.server_type == "cpu"]
        if preferred:
            rejections.extend(
                Rejection(c.id, "NOT_PREFERRED", "CPU services prefer cpu servers and one is available")
                for c in feasible
                if c.server_type != "cpu"
            )
            feasible = preferred
    chosen = _best(feasible)
    gpus = tuple(chosen.free_gpus[: request.gpu_count])
    return Placement(chosen.id, gpus, tuple(rejections))


def _eligible(c: ControllerView) -> bool:
    """Passes the checks that do not depend on the request (disabled, draining, unhealthy)."""
    return c.enabled and not c.draining and c.healthy


def _key(c: ControllerView) -> tuple[int, float, str]:
    return (c.priority, _load_after(c), c.id)


class CandidateIndex:
    """The controllers of a snapshot, indexed so that a placement costs O(log n) rather than a pass over all.

    ``place()`` answers exactly as the module's ``place()`` would on ``views()``
    (a failed placement is handed to it, for the rejections). ``reserve()`` and
    ``release()`` change one controller's counts after a placement or its undoing.
    """

    def __init__(self, views: Iterable[ControllerView]) -> None:
        self._views: dict[str, ControllerView] = {}
        self._heaps: dict[str, list[tuple[int, float, str]]] = {}
        for v in views:
            self._views[v.id] = v
            if _eligible(v):
                self._heaps.setdefault(v.server_type, []).append(_key(v))
        for heap in self._heaps.values():
            heapq.heapify(heap)

    def views(self) -> list[ControllerView]:
        return list(self._views.values())

    def get(self, controller_id: str) -> ControllerView | None:
        return self._views.get(controller_id)

    def __len__(self) -> int:
        return len(self._views)

    def _first(self, server_type: str, request: PlacementRequest,
               popped: list[tuple[str, tuple[int, float, str]]]) -> ControllerView | None:
        """The best controller of one type that passes every check; what was looked at goes to ``popped``."""
        heap = self._heaps.get(server_type)
        while heap:
            key = heapq.heappop(heap)
            c = self._views.get(key[2])
            if c is None or _key(c) != key or not _eligible(c):
                continue  # an entry from before a reserve/release: its current one is elsewhere in the heap
            popped.append((server_type, key))
            if feasibility(c, request) is None:
                return c
        return None

    def place(self, request: PlacementRequest) -> Placement:
        if request.gpu_count > 0:
            groups = [["gpu"]] if request.server_type in (None, "gpu") else []
        elif request.server_type is not None:
            groups = [[request.server_type]]
        else:
            groups = [["cpu"], sorted(t for t in self._heaps if t != "cpu")]
        popped: list[tuple[str, tuple[int, float, str]]] = []
        chosen: ControllerView | None = None
        try:
            for types in groups:
                found = [c for t in types if (c := self._first(t, request, popped)) is not None]
                if found:
                    chosen = min(found, key=_key)
                    break
        finally:
            for server_type, key in popped:
                heapq.heappush(self._heaps[server_type], key)
        if chosen is None:
            return place(self._views.values(), request)
        return Placement(chosen.id, tuple(chosen.free_gpus[: request.gpu_count]), ())

    def _update(self, c: ControllerView) -> None:
        self._views[c.id] = c
        if _eligible(c):
            heapq.heappush(self._heaps.setdefault(c.server_type, []), _key(c))

    def reserve(self, controller_id: str, memory: int, cpu: float, gpus: Iterable[str]) -> None:
        c = self._views.get(controller_id)
        if c is not None:
            self._update(replace(c, containers=c.containers + 1, memory_reserved=c.memory_reserved + memory,
                                 cpu_reserved=c.cpu_reserved + cpu, gpus_used=c.gpus_used | frozenset(gpus)))

    def release(self, controller_id: str, memory: int, cpu: float, gpus: Iterable[str]) -> None:
        c = self._views.get(controller_id)
        if c is not None:
            self._update(replace(c, containers=max(c.containers - 1, 0),
                                 memory_reserved=max(c.memory_reserved - memory, 0),
                                 cpu_reserved=max(c.cpu_reserved - cpu, 0.0), gpus_used=c.gpus_used - frozenset(gpus)))

    def forget(self, controller_id: str) -> None:
        """Take a controller out of placement until the next snapshot (the database says it is unfit)."""
        c = self._views.get(controller_id)
        if c is not None:
            self._views[controller_id] = replace(c, healthy=False)
