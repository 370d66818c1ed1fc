"""Where a service should run (SPEC section 8).

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

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
CHECKS: tuple[Check, ...] = (_excluded, _disabled, _unhealthy, _server_type, _container_cap, _gpus, _memory, _cpu)


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
