"""Failure handling as pure functions: no database, no HTTP, no clock of their own.

``fence(rows, containers, orphan_grace)`` compares what a controller reports
running with what the registry says should run there, and decides what it must
stop and how the registry rows change.

``compute(snapshot, now)`` decides, from one snapshot of controllers and
services, which controllers are lost and which services must move. The
reconciler loop applies the actions; tests feed snapshots and times directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from mmanager.wire import HeartbeatContainer, StopOrder

# ------------------------------------------------------------------ fencing


@dataclass(frozen=True)
class RegistryRow:
    id: str
    service_id: str
    epoch: int
    container_id: str | None
    status: str
    health: str = "unknown"
    health_restarts: int = 0
    updated_at: datetime | None = None


@dataclass(frozen=True)
class RowUpdate:
    id: str
    service_id: str
    container_id: str
    status: str
    health: str
    health_restarts: int
    ports: dict[str, int | None]
    # Written with the health it explains (compared with nothing: it changes only with the health).
    health_detail: str | None = None


@dataclass(frozen=True)
class AttemptState:
    """A batch job's attempt as the fence judges its container: live only while ``starting`` or ``running``
    and the job's current one (``number == job_epoch``)."""

    number: int
    status: str
    job_epoch: int

    @property
    def live(self) -> bool:
        return self.status in ("starting", "running") and self.number == self.job_epoch


@dataclass
class FenceResult:
    stop: list[StopOrder] = field(default_factory=list)
    # Rows whose container changed state or health since the registry last heard.
    updates: list[RowUpdate] = field(default_factory=list)
    # Stale rows whose container is gone: the move is complete.
    gone: list[str] = field(default_factory=list)


def fence(rows: Iterable[RegistryRow], containers: Iterable[HeartbeatContainer], orphan_grace: float,
          missing_before: datetime | None = None, drained_before: datetime | None = None,
          attempts: Mapping[str, AttemptState] | None = None) -> FenceResult:
    """What one controller must stop, given its registry rows and what it runs.

    - a container whose row is ``stale`` (a newer epoch runs elsewhere) stops at once;
    - one whose row is ``draining`` (superseded by a planned move that waits for the gateways to stop
      sending it requests, and then removes it) is left alone, unless the row was last written before
      ``drained_before`` (the move's hub died meanwhile): then it is stale;
    - a container of ours with no row at all stops once it is older than
      ``orphan_grace``: its service was deleted, or a create was lost half-way
      (the registry row is written before the controller is asked, so a young
      container without one is only ever a create still in flight elsewhere);
    - containers created outside the hub (no service label) are not ours to fence;
    - a batch job's container (``attempt_id``) stops (``stale_attempt``) when its attempt is not live (ended,
      lost, or not the job's current one), or has no row and is older than ``orphan_grace``; judged only
      when ``attempts`` (the attempts the containers name) is given;
    - a row whose container is not reported is ``missing`` if it was last
      written before ``missing_before`` (younger rows may be newer than the listing).
    """
    by_key: dict[tuple[str, int], RegistryRow] = {}
    for row in rows:
        if row.status == "draining" and drained_before is not None and row.updated_at is not None \
                and row.updated_at < drained_before:
            row = replace(row, status="stale")
        by_key[(row.service_id, row.epoch)] = row
    result = FenceResult()
    seen: set[str] = set()
    for c in containers:
        if c.attempt_id is not None:
            if attempts is not None:
                attempt = attempts.get(c.attempt_id)
                if (attempt is None and c.age_seconds >= orphan_grace) or (attempt is not None and not attempt.live):
                    result.stop.append(StopOrder(container_id=c.container_id, epoch=c.epoch, reason="stale_attempt",
                                                 attempt_id=c.attempt_id))
            continue
        if not c.service_id or c.epoch is None:
            continue
        found = by_key.get((c.service_id, c.epoch))
        if found is None:
            if c.age_seconds >= orphan_grace:
                result.stop.append(
                    StopOrder(container_id=c.container_id, service_id=c.service_id, epoch=c.epoch, reason="orphan")
                )
            continue
        row = found
        seen.add(row.id)
        if row.status == "draining":
            continue
        if row.status == "stale":
            result.stop.append(
                StopOrder(container_id=c.container_id, service_id=c.service_id, epoch=c.epoch, reason="stale_epoch")
            )
            continue
        if (row.status, row.health, row.health_restarts, row.container_id) != (
            c.state,
            c.health,
            c.health_restarts,
            c.container_id,
        ):
            result.updates.append(
                RowUpdate(row.id, row.service_id, c.container_id, c.state, c.health, c.health_restarts, c.ports,
                          c.health_detail)
            )
    for row in by_key.values():
        if row.id in seen:
            continue
        if row.status in ("stale", "draining"):
            result.gone.append(row.id)
        elif row.status not in ("creating", "missing") and (
            missing_before is None or (row.updated_at is not None and row.updated_at < missing_before)
        ):
            # It ran here and is no longer reported: removed behind our back.
            result.updates.append(
                RowUpdate(row.id, row.service_id, row.container_id or "", "missing", "unknown", 0, {})
            )
    return result


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class ControllerState:
    id: str
    status: str  # healthy | unhealthy | unknown
    last_heartbeat_at: datetime | None
    enabled: bool = True
    draining: bool = False


@dataclass(frozen=True)
class ServiceState:
    id: str
    desired_state: str
    status: str
    controller_id: str | None
    health: str = "unknown"
    health_restarts: int = 0
    # A live hub replica is running an operation on it: leave it alone.
    busy: bool = False
    # One of its replicas other than its primary copy (its registry row; on ``controller_id``, with that
    # copy's health): only its controller's loss or drain, or its failing health, move it.
    replica: str | None = None
    # Its replicas are not its count (a copy found gone, a create or scale that could not finish): recounted.
    recount: bool = False


@dataclass(frozen=True)
class Snapshot:
    controllers: Sequence[ControllerState]
    services: Sequence[ServiceState]
    # When this hub became the one that runs the loops: every controller gets a full grace from then.
    leader_since: datetime
    grace: float
    # In-place restarts (done by the controller) before an unhealthy service is moved elsewhere.
    max_health_restarts: int = 3
    # Controllers that moves still in flight are taking services off (a drain is not done before they finish).
    moving_from: frozenset[str] = frozenset()
    # Controllers that still hold a registry row that is not stale (a create in flight counts).
    hosting: frozenset[str] = frozenset()
    # When this replica last heard each controller (its beat arrived), whether or not that is written yet:
    # a hub slow to record beats must not declare the controllers that sent them lost.
    heard: Mapping[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class MarkLost:
    controller_id: str
    silent_for: float


@dataclass(frozen=True)
class Move:
    """Run the service's container somewhere else (or, for ``resume``, anywhere that works)."""

    service_id: str
    reason: str  # controller_lost | drain | unhealthy | resume | replicas
    exclude: frozenset[str] = frozenset()
    # Where the service is in the snapshot; the move is dropped if that changed before it runs.
    from_controller: str | None = None
    # The registry row of the replica it moves, when not the service's primary copy.
    replica: str | None = None


@dataclass(frozen=True)
class FinishDrain:
    controller_id: str


Action = MarkLost | Move | FinishDrain

# Statuses that mean "no settled container": a create, migrate or failover did not finish.
UNSETTLED = frozenset({"pending", "lost", "migrating"})


def at_risk(controllers: Iterable[ControllerState], now: datetime, grace: float, leader_since: datetime,
            heard: Mapping[str, datetime]) -> tuple[set[str], set[str], list[MarkLost]]:
    """Of ``controllers``: the lost ones (silent past the grace, counted from when this hub became leader at
    the earliest, or marked lost and not yet back through a heartbeat), the draining ones, and the lost
    ones to mark. Only services on these can be moved for their controller's sake."""
    span = timedelta(seconds=grace)
    lost: set[str] = set()
    draining: set[str] = set()
    marks: list[MarkLost] = []
    for c in controllers:
        last = max(c.last_heartbeat_at or leader_since, leader_since)
        if c.id in heard:
            last = max(last, heard[c.id])
        silent = now - last
        if silent > span:
            lost.add(c.id)
            if c.status != "unhealthy":
                marks.append(MarkLost(c.id, silent.total_seconds()))
        elif c.status == "unhealthy":
            # Seen again, but not yet through a heartbeat that fenced its stale copies.
            lost.add(c.id)
        if c.draining:
            draining.add(c.id)
    return lost, draining, marks


def compute(snapshot: Snapshot, now: datetime) -> list[Action]:
    lost, draining, marks = at_risk(snapshot.controllers, now, snapshot.grace, snapshot.leader_since, snapshot.heard)
    actions: list[Action] = list(marks)

    # One exclusion set per controller moved off, shared by its moves: a mass failover moves thousands
    # of services off hundreds of lost controllers, and a set built per move costs lost × moves a tick.
    gone = frozenset(lost)
    excluding: dict[str | None, frozenset[str]] = {}

    def without(on: str | None) -> frozenset[str]:
        if on is None or on in gone:
            return gone
        if on not in excluding:
            excluding[on] = gone | {on}
        return excluding[on]

    occupied: set[str] = set()
    for s in snapshot.services:
        if s.controller_id is not None:
            occupied.add(s.controller_id)
        if s.busy:
            continue
        on = s.controller_id
        if s.recount:
            actions.append(Move(s.id, "replicas", gone, None))
            continue
        if s.desired_state == "running":
            if (s.status in UNSETTLED or on is None) and s.replica is None:
                actions.append(Move(s.id, "resume", gone, on))
            elif on in lost:
                actions.append(Move(s.id, "controller_lost", without(on), on, s.replica))
            elif on in draining:
                actions.append(Move(s.id, "drain", without(on), on, s.replica))
            elif s.health == "unhealthy" and s.health_restarts >= snapshot.max_health_restarts:
                actions.append(Move(s.id, "unhealthy", without(on), on, s.replica))
        elif on in draining and on not in lost:
            # A stopped service moves too (it stays stopped): draining hands everything over.
            actions.append(Move(s.id, "drain", without(on), on, s.replica))
    for c in snapshot.controllers:
        if c.draining and not ({c.id} & (occupied | snapshot.moving_from | snapshot.hosting)):
            actions.append(FinishDrain(c.id))
    return actions
