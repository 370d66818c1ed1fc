"""The failure-handling decisions, as pure functions of a snapshot and the time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hub.scheduler.reconcile import (
    ControllerState,
    FinishDrain,
    MarkLost,
    Move,
    RegistryRow,
    ServiceState,
    Snapshot,
    compute,
    fence,
)
from mmanager.wire import HeartbeatContainer

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def container(cid: str, service: str | None, epoch: int | None, state: str = "running", age: float = 60.0,
              health: str = "unknown") -> HeartbeatContainer:
    return HeartbeatContainer(container_id=cid, name=cid, service_id=service, epoch=epoch, state=state,
                              age_seconds=age, health=health)


# ----------------------------------------------------------------- fencing


def test_stale_epoch_is_stopped_at_once_and_current_one_kept() -> None:
    rows = [RegistryRow("r1", "s1", 1, "c-old", "stale"), RegistryRow("r2", "s2", 4, "c-cur", "running")]
    result = fence(rows, [container("c-old", "s1", 1, age=0.5), container("c-cur", "s2", 4)], orphan_grace=10)
    assert [(o.container_id, o.reason) for o in result.stop] == [("c-old", "stale_epoch")]
    assert result.updates == [] and result.gone == []


def test_orphans_wait_for_the_grace_and_foreign_containers_are_never_touched() -> None:
    containers = [
        container("young", "s9", 1, age=2),
        container("old", "s9", 2, age=30),
        container("geoml", None, None, age=1000),  # made by a GeoML-Hub client: no service label
    ]
    result = fence([], containers, orphan_grace=10)
    assert [(o.container_id, o.reason) for o in result.stop] == [("old", "orphan")]


def test_same_service_other_epoch_without_row_is_an_orphan_not_the_current_copy() -> None:
    rows = [RegistryRow("r1", "s1", 3, "c3", "running")]
    result = fence(rows, [container("c3", "s1", 3), container("c2", "s1", 2, age=60)], orphan_grace=10)
    assert [o.container_id for o in result.stop] == ["c2"]


def test_state_changes_are_reported_once_and_gone_stale_rows_are_released() -> None:
    rows = [
        RegistryRow("r1", "s1", 1, "c1", "running", "unknown", 0),
        RegistryRow("r2", "s2", 1, "c2", "stale"),
        RegistryRow("r3", "s3", 1, None, "creating"),
    ]
    result = fence(rows, [container("c1", "s1", 1, state="exited", health="unknown")], orphan_grace=10)
    assert [(u.id, u.status) for u in result.updates] == [("r1", "exited")]
    assert result.gone == ["r2"]  # the stale copy is gone: the move is complete
    # unchanged: nothing to write
    again = fence([RegistryRow("r1", "s1", 1, "c1", "exited")], [container("c1", "s1", 1, state="exited")], 10)
    assert again.updates == []


def test_a_vanished_container_is_missing_only_when_its_row_is_older_than_the_listing() -> None:
    old = RegistryRow("r1", "s1", 1, "c1", "running", updated_at=at(0))
    young = RegistryRow("r2", "s2", 1, "c2", "running", updated_at=at(9))
    result = fence([old, young], [], orphan_grace=10, missing_before=at(5))
    assert [(u.id, u.status) for u in result.updates] == [("r1", "missing")]


# --------------------------------------------------------------- decisions


def snapshot(controllers: list[ControllerState], services: list[ServiceState], leader_since: datetime = T0,
             grace: float = 6) -> Snapshot:
    return Snapshot(controllers, services, leader_since, grace)


def healthy(cid: str, last: float = 0, **kw: object) -> ControllerState:
    return ControllerState(cid, "healthy", at(last), **kw)


def svc(sid: str, on: str | None, status: str = "running", desired: str = "running", **kw: object) -> ServiceState:
    return ServiceState(sid, desired, status, on, **kw)


def test_a_silent_controller_is_lost_after_the_grace_and_its_services_move_elsewhere() -> None:
    snap = snapshot([healthy("a", last=10), healthy("b", last=10)], [svc("s1", "a"), svc("s2", "b")])
    assert compute(snap, at(15)) == []  # 5 s of silence < 6 s grace
    actions = compute(snapshot([healthy("a", last=10), healthy("b", last=16)], [svc("s1", "a"), svc("s2", "b")]),
                      at(16.5))
    assert MarkLost("a", 6.5) in actions
    assert Move("s1", "controller_lost", frozenset({"a"}), "a") in actions
    assert not any(isinstance(a, Move) and a.service_id == "s2" for a in actions)


def test_a_beat_heard_but_not_yet_written_keeps_its_controller() -> None:
    # The table says a was last heard at 0 (the hub is behind on writing beats); this replica heard it at 12.
    controllers = [healthy("a", last=0), healthy("b", last=0)]
    snap = Snapshot(controllers, [svc("s1", "a"), svc("s2", "b")], T0, 6, heard={"a": at(12), "b": at(1)})
    actions = compute(snap, at(16.5))
    assert [a for a in actions if isinstance(a, MarkLost)] == [MarkLost("b", 15.5)]
    assert [a.service_id for a in actions if isinstance(a, Move)] == ["s2"]
    # Heard before what the table says: the table decides.
    assert MarkLost("a", 16.5) in compute(Snapshot(controllers, [], T0, 6, heard={"a": at(-5)}), at(16.5))


def test_a_fresh_leader_gives_every_controller_a_full_grace() -> None:
    # The hub was down for a minute: every heartbeat in the table is old.
    controllers = [healthy("a", last=0), healthy("b", last=0)]
    since = at(60)
    assert compute(snapshot(controllers, [svc("s1", "a")], leader_since=since), at(65)) == []
    late = compute(snapshot(controllers, [svc("s1", "a")], leader_since=since), at(66.5))
    assert {a.controller_id for a in late if isinstance(a, MarkLost)} == {"a", "b"}


def test_busy_and_stopped_services_are_left_alone() -> None:
    lost = ControllerState("a", "unhealthy", at(0))
    services = [svc("busy", "a", busy=True), svc("stopped", "a", status="stopped", desired="stopped")]
    assert compute(snapshot([lost, healthy("b", last=99)], services), at(100)) == []


def test_unsettled_services_are_resumed_away_from_lost_controllers() -> None:
    controllers = [ControllerState("a", "unhealthy", at(0)), healthy("b", last=99)]
    services = [svc("pending", None, status="pending"), svc("migrating", "b", status="migrating"),
                svc("lost", "a", status="lost")]
    moves = {a.service_id: a for a in compute(snapshot(controllers, services), at(100)) if isinstance(a, Move)}
    assert {sid: m.reason for sid, m in moves.items()} == {"pending": "resume", "migrating": "resume", "lost": "resume"}
    assert all(m.exclude == frozenset({"a"}) for m in moves.values())


def test_draining_moves_everything_then_finishes() -> None:
    draining = healthy("a", last=99, enabled=False, draining=True)
    services = [svc("s1", "a"), svc("s2", "a", status="stopped", desired="stopped")]
    actions = compute(snapshot([draining, healthy("b", last=99)], services), at(100))
    assert {(a.service_id, a.reason) for a in actions if isinstance(a, Move)} == {("s1", "drain"), ("s2", "drain")}
    assert not any(isinstance(a, FinishDrain) for a in actions)
    done = compute(snapshot([draining, healthy("b", last=99)], [svc("s1", "b")]), at(100))
    assert done == [FinishDrain("a")]


def test_an_unhealthy_service_moves_only_after_its_in_place_restarts() -> None:
    controllers = [healthy("a", last=99), healthy("b", last=99)]
    few = compute(snapshot(controllers, [svc("s1", "a", health="unhealthy", health_restarts=2)]), at(100))
    assert few == []
    many = compute(snapshot(controllers, [svc("s1", "a", health="unhealthy", health_restarts=3)]), at(100))
    assert many == [Move("s1", "unhealthy", frozenset({"a"}), "a")]


def test_a_controller_still_marked_unhealthy_gets_no_work_until_it_beats_again() -> None:
    # Polled back but not yet through a fencing heartbeat: still treated as lost.
    controllers = [ControllerState("a", "unhealthy", at(99)), healthy("b", last=99)]
    actions = compute(snapshot(controllers, [svc("s1", "a")]), at(100))
    assert actions == [Move("s1", "controller_lost", frozenset({"a"}), "a")]


def test_a_drain_is_not_done_while_a_move_off_it_is_still_running() -> None:
    draining = healthy("a", last=99, enabled=False, draining=True)
    # The service already points elsewhere, but its move (stopping the new copy, retiring the old) is not finished.
    snap = Snapshot([draining, healthy("b", last=99)], [svc("s1", "b", busy=True)], T0, 6,
                    moving_from=frozenset({"a"}))
    assert compute(snap, at(100)) == []


def test_a_drain_is_not_done_while_a_create_onto_it_is_in_flight() -> None:
    draining = healthy("a", last=99, enabled=False, draining=True)
    snap = Snapshot([draining, healthy("b", last=99)], [svc("s1", "b")], T0, 6, hosting=frozenset({"a", "b"}))
    assert compute(snap, at(100)) == []


def test_a_draining_copy_is_left_running_until_its_move_could_no_longer_be_waiting() -> None:
    from datetime import UTC, datetime, timedelta

    from hub.scheduler.reconcile import RegistryRow, fence
    from mmanager.wire import HeartbeatContainer

    now = datetime.now(UTC)
    row = RegistryRow("r1", "s1", 1, "c1", "draining", "healthy", 0, now - timedelta(seconds=5))
    running = [HeartbeatContainer(container_id="c1", name="mm-s1", service_id="s1", epoch=1, state="running", health="healthy",
                                  health_restarts=0, age_seconds=60.0, ports={})]
    assert fence([row], running, 10.0, drained_before=now - timedelta(seconds=90)).stop == []
    old = RegistryRow("r1", "s1", 1, "c1", "draining", "healthy", 0, now - timedelta(seconds=120))
    [order] = fence([old], running, 10.0, drained_before=now - timedelta(seconds=90)).stop
    assert order.reason == "stale_epoch"


def test_a_replica_moves_off_its_lost_controller_and_a_miscounted_service_is_recounted() -> None:
    controllers = [ControllerState("a", "unhealthy", at(0)), healthy("b", last=99), healthy("c", last=99)]
    services = [
        # Its primary copy on b is fine; the replica on a is lost, even while the service is mid-move.
        svc("two", "b"), svc("two", "a", status="migrating", replica="row-2"),
        # A replica that keeps failing its check after its restarts is moved like a primary copy.
        svc("sick", "c", replica="row-s", health="unhealthy", health_restarts=3),
        # Not the replicas it should run: recounted, wherever fits (nothing to move away from).
        svc("short", "b", recount=True),
    ]
    moves = [a for a in compute(snapshot(controllers, services), at(100)) if isinstance(a, Move)]
    assert moves == [Move("two", "controller_lost", frozenset({"a"}), "a", "row-2"),
                     Move("sick", "unhealthy", frozenset({"a", "c"}), "c", "row-s"),
                     Move("short", "replicas", frozenset({"a"}), None)]
