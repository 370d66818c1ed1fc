"""Controllers at run time: PATCH and DELETE /api/admin/controllers/{id} on real PostgreSQL, with controllers on
the real Docker engine; and MMANAGER_CONTROLLERS read again from its file."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from hub.app import build_hub, create_app
from hub.background.controllers_file import ControllersFileWatch
from hub.config import HubSettings
from hub.db import Database
from hub.models import (
    AuditModel,
    ContainerRegistryModel,
    ControllerKeyModel,
    ControllerModel,
    OperationModel,
    ServiceModel,
    utcnow,
)
from hub.services.controller_keys import create_key
from hub.services.lifecycle import sql
from hub.services.users import create_user
from tests.hub.conftest import KEY, Cluster
from tests.hub.test_controller_keys import key_hub
from tests.hub.test_failure_handling import heartbeat
from tests.hub.test_services_api import SPEC
from tests.support.poll import eventually, wait_until
from tests.support.procs import LocalDeployment, api


async def audit(cluster: Cluster, **params: Any) -> list[dict[str, Any]]:
    r = await cluster.hub.get("/api/admin/audit", params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


async def create(cluster: Cluster, name: str) -> dict[str, Any]:
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_a_patch_is_what_the_next_placement_uses_and_is_audited(cluster: Cluster) -> None:
    cpu1, cpu2 = cluster.controller_ids[1], cluster.controller_ids[2]
    assert (await create(cluster, "before"))["controller_id"] == cpu1  # the best priority tier (1) of the cpus

    r = await cluster.hub.patch(f"/api/admin/controllers/{cpu2}", json={"priority": 0, "weight": 150})
    assert r.status_code == 200, r.text
    assert (r.json()["priority"], r.json()["weight"]) == (0, 150)
    assert (await create(cluster, "after"))["controller_id"] == cpu2

    # A cap of one on cpu2, which runs one now: the next goes to cpu1 again; lifting it brings cpu2 back.
    r = await cluster.hub.patch(f"/api/admin/controllers/{cpu2}", json={"max_containers": 1})
    assert (r.json()["max_containers"], r.json()["max_containers_cap"]) == (1, 1)
    assert (await create(cluster, "capped"))["controller_id"] == cpu1
    r = await cluster.hub.patch(f"/api/admin/controllers/{cpu2}", json={"max_containers": None})
    assert (r.json()["max_containers"], r.json()["max_containers_cap"]) == (20, None)  # the controller's own
    assert (await create(cluster, "uncapped"))["controller_id"] == cpu2

    [first, *_] = await audit(cluster, target=cpu2, method="PATCH", actor="admin")
    assert first["status_code"] == 200 and first["details"]["changes"] == {
        "max_containers": {"before": 1, "after": None}}
    changed = [row["details"]["changes"] for row in await audit(cluster, target=cpu2, method="PATCH")]
    assert {"priority": {"before": 2, "after": 0}, "weight": {"before": 100, "after": 150}} in changed


async def test_a_new_url_is_where_the_hub_reaches_the_controller(cluster: Cluster) -> None:
    cpu1 = cluster.controller_ids[1]
    old, new = cluster.hosts[cpu1], f"moved-{cluster.hosts[cpu1]}"
    cluster.router.apps[new] = cluster.router.apps[old]
    cluster.router.down.add(old)
    r = await cluster.hub.patch(f"/api/admin/controllers/{cpu1}", json={"url": f"http://{new}:8001/"})
    assert r.status_code == 200, r.text
    # Asked there at once: healthy by its answer at the new URL (no error), not by a pushed beat's flush.
    assert (r.json()["url"], r.json()["status"], r.json()["error"]) == (f"http://{new}:8001", "healthy", None)
    service = await create(cluster, "moved")
    assert service["controller_id"] == cpu1 and service["endpoint"]["host"] == new
    assert service["status"] == "running"


@pytest.mark.parametrize("body", [
    {"weight": -1}, {"weight": 0}, {"priority": -1}, {"priority": 1001}, {"max_containers": 0},
    {"max_containers": 100_001}, {"server_type": "tpu"}, {"url": "ftp://host:1"}, {"url": "http://host/path"},
    {"url": "http://a b"}, {}, {"priority": None}, {"enabled": False}, {"weight": "heavy"},
])
async def test_a_bad_patch_is_refused_and_changes_nothing(cluster: Cluster, body: dict[str, Any]) -> None:
    cpu2 = cluster.controller_ids[2]
    before = (await cluster.hub.get(f"/api/admin/controllers/{cpu2}")).json()
    r = await cluster.hub.patch(f"/api/admin/controllers/{cpu2}", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR", (body, r.text)
    after = (await cluster.hub.get(f"/api/admin/controllers/{cpu2}")).json()
    assert {k: v for k, v in after.items() if k != "last_heartbeat_at"} == {
        k: v for k, v in before.items() if k != "last_heartbeat_at"}


async def test_unknown_controllers_and_non_admins_are_refused(cluster: Cluster) -> None:
    r = await cluster.hub.patch("/api/admin/controllers/nope", json={"weight": 5})
    assert r.status_code == 404 and r.json()["error"]["code"] == "CONTROLLER_NOT_FOUND"
    r = await cluster.hub.delete("/api/admin/controllers/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "CONTROLLER_NOT_FOUND"
    alice = await cluster.user("alice")
    cpu2 = cluster.controller_ids[2]
    assert (await cluster.hub.patch(f"/api/admin/controllers/{cpu2}", json={"weight": 5}, headers=alice)
            ).status_code == 403
    assert (await cluster.hub.delete(f"/api/admin/controllers/{cpu2}", headers=alice)).status_code == 403
    assert (await cluster.hub.get(f"/api/admin/controllers/{cpu2}")).json()["weight"] == 100


async def test_delete_refuses_a_controller_with_services_and_drains_when_asked(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    service = await create(cluster, "held")
    assert service["controller_id"] == cpu1
    r = await cluster.hub.delete(f"/api/admin/controllers/{cpu1}")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "CONTROLLER_HAS_SERVICES"
    assert error["details"]["services"] == [service["id"]] and error["details"]["containers_count"] == 1
    assert (await cluster.hub.get(f"/api/admin/controllers/{cpu1}")).json()["enabled"] is True

    # Asked to drain first: the service moves, then the controller goes, with its keys; its history stays.
    async with cluster.db.session() as session:
        await create_key(session, cpu1, created_by="admin")
    r = await cluster.hub.delete(f"/api/admin/controllers/{cpu1}", params={"drain": "true"})
    assert r.status_code == 204, r.text
    moved = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert moved["controller_id"] == cpu2 and moved["status"] == "running"
    assert (await cluster.hub.get(f"/api/admin/controllers/{cpu1}")).status_code == 404
    async with cluster.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ControllerKeyModel)
                                    .where(ControllerKeyModel.controller_id == cpu1)) == 0
        assert await session.scalar(select(func.count()).select_from(ContainerRegistryModel)
                                    .where(ContainerRegistryModel.controller_id == cpu1)) == 0
        drains = list(await session.scalars(select(OperationModel).where(OperationModel.controller_id == cpu1)))
    assert {(o.operation, o.status) for o in drains} >= {("create", "succeeded"), ("drain", "succeeded")}
    [deleted, refused] = await audit(cluster, target=cpu1, method="DELETE")
    assert (refused["status_code"], refused["error_code"]) == (409, "CONTROLLER_HAS_SERVICES")
    assert deleted["status_code"] == 204 and deleted["details"]["drained"] is True
    assert deleted["details"]["controller"]["url"] == f"http://{cluster.hosts[cpu1]}:8001"

    # The next placement does without it; an empty controller goes at once.
    assert (await create(cluster, "next"))["controller_id"] == cpu2
    assert (await cluster.hub.delete(f"/api/admin/controllers/{gpu}")).status_code == 204
    assert [c["id"] for c in (await cluster.hub.get("/api/admin/controllers")).json()] == [cpu2]


# ---------------------------------------------------------------------------------- MMANAGER_CONTROLLERS reload


def entry(cid: str, **fields: Any) -> dict[str, Any]:
    return {"id": cid, "url": f"http://{cid}.invalid:8001", "server_type": "cpu", **fields}


def write(path: Path, entries: list[dict[str, Any]] | str) -> None:
    path.write_text(entries if isinstance(entries, str) else json.dumps({"controllers": entries}))


async def rows(db: Database) -> dict[str, tuple[Any, ...]]:
    async with db.session() as session:
        return {c.id: (c.url, c.enabled, c.priority, c.weight)
                for c in await session.scalars(select(ControllerModel))}


async def test_a_changed_file_is_applied_without_a_restart(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "controllers.json"
    write(path, [entry("a"), entry("b"), entry("c", api_key="c-key-" + "k" * 20)])
    settings = HubSettings(database_url=db.url, api_key=KEY, controllers=str(path), controllers_watch_interval=0,
                           model_store=tmp_path / "models", artifact_store=tmp_path / "artifacts")
    hub = build_hub(settings, db=Database(db.url))
    app = create_app(settings, hub=hub, run_loops=False)
    async with app.router.lifespan_context(app):
        assert set(await rows(db)) == {"a", "b", "c"}
        async with db.session() as session:
            owner, _ = await create_user(session, "owner")
            session.add(ServiceModel(id="s1", name="held", owner_id=owner.id, repo="r", spec={}, controller_id="b"))
        # An admin's change through the API survives an edit of the file that leaves that entry alone.
        async with db.session() as session:
            (await session.get(ControllerModel, "a")).weight = 7  # type: ignore[union-attr]
        watch = ControllersFileWatch(hub.controllers, path, 1.0)

        # a changed, b and c gone (b holds a service: disabled and kept), d new. The first look only notes the
        # new version (it may be half-written); the next one that sees it too applies it.
        write(path, [entry("a", priority=5, weight=100), entry("d", weight=300)])
        before = await rows(db)
        await watch.run_once()
        assert await rows(db) == before
        await watch.run_once()
        # a's weight, which the file did not change, keeps the admin's 7.
        assert await rows(db) == {"a": ("http://a.invalid:8001", True, 5, 7),
                                  "b": ("http://b.invalid:8001", False, 1, 100),
                                  "d": ("http://d.invalid:8001", True, 1, 300)}
        assert [e.id for e in settings.controller_entries] == ["a", "d", "b"]
        assert settings.key_for("c") == KEY  # its own key is no longer presented to anyone

        started = [(e.target, e.details["action"]) for e in await audit_rows(db) if e.details["trigger"] == "start"]
        assert started == [("a", "registered"), ("b", "registered"), ("c", "registered")]
        events = {(e.target, e.details.get("action")): e for e in await audit_rows(db)
                  if e.details["trigger"] == "file changed"}
        assert set(events) == {("a", "updated"), ("b", "disabled"), ("c", "deleted"), ("d", "registered")}
        assert all(e.actor == "system" and e.method == "RELOAD" for e in events.values())
        assert events[("a", "updated")].details["changes"] == {"priority": {"before": 1, "after": 5}}
        assert events[("b", "disabled")].details["holds"]["services"] == ["s1"]

        # A file that is not valid changes nothing, and says why once. An empty, truncated or mis-keyed one is
        # not valid: it would otherwise delete every controller the file listed.
        before = await rows(db)
        bad_files: list[Any] = ["[{\"id\": \"a\", \"url\": \"gopher://x\"}]", "{not json", [entry("a"), entry("a")],
                                [entry("e", api_key="weakkey9")], "", "controllers:\n", "controller: []\n",
                                "{\"controllers\": null}", [entry("e", url="http://[")]]
        for bad in bad_files:
            write(path, bad)
            for _ in range(3):
                await watch.run_once()
        assert await rows(db) == before
        refused = [e for e in await audit_rows(db) if e.error_code == "CONTROLLERS_FILE_INVALID"]
        assert len(refused) == len(bad_files) and "weakkey9" not in json.dumps([e.details for e in refused])

        # Once b holds nothing, the next reload deletes it.
        async with db.session() as session:
            await session.delete(await session.get(ServiceModel, "s1"))
        write(path, [entry("a", priority=5), entry("d", weight=300)])
        await watch.run_once()
        await watch.run_once()
        assert set(await rows(db)) == {"a", "d"}


async def audit_rows(db: Database) -> list[Any]:
    async with db.session() as session:
        return list(await session.scalars(select(AuditModel).where(AuditModel.method == "RELOAD")
                                          .order_by(AuditModel.id)))


async def test_sighup_reloads_a_real_hub(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "controllers.yaml"
    path.write_text("controllers:\n  - id: one\n    url: http://127.0.0.1:9\n")
    dep = LocalDeployment(db.url, tmp_path / "lab", extra_hub_env={
        "MMANAGER_CONTROLLERS": str(path), "MMANAGER_CONTROLLERS_WATCH_INTERVAL": "0"})
    dep.plan_hubs(1)
    hub = dep.hub(0)
    try:
        dep.start()
        token = dep.create_admin()
        with api(hub.url, token) as client:
            def ids() -> list[str]:
                return [c["id"] for c in client.get("/api/admin/controllers").raise_for_status().json()]

            assert ids() == ["one"]
            path.write_text("controllers:\n  - id: one\n    url: http://127.0.0.1:9\n"
                            "  - id: two\n    url: http://127.0.0.1:10\n    weight: 50\n")
            hub.signal(signal.SIGHUP)
            wait_until(lambda: ids() == ["one", "two"], 10, "the controller added to the file", interval=0.1)
            assert hub.popen is not None and hub.popen.poll() is None  # SIGHUP did not end it
            events = client.get("/api/admin/audit", params={"actor": "system", "target": "two"}).json()
            assert events[0]["details"]["trigger"] == "SIGHUP"
    finally:
        dep.stop()


async def looked(watch: ControllersFileWatch) -> None:
    """Two looks: the first notes the file's new version, the second applies it."""
    await watch.run_once()
    await watch.run_once()


def file_hub(db: Database, tmp_path: Path, path: Path) -> tuple[Any, Any, HubSettings]:
    settings = HubSettings(database_url=db.url, api_key=KEY, controllers=str(path), controllers_watch_interval=0,
                           model_store=tmp_path / "models", artifact_store=tmp_path / "artifacts")
    hub = build_hub(settings, db=Database(db.url))
    return hub, create_app(settings, hub=hub, run_loops=False), settings


async def controller(db: Database, cid: str) -> ControllerModel:
    async with db.session() as session:
        row = await session.get(ControllerModel, cid)
        assert row is not None
        return row


async def test_an_edit_of_one_field_keeps_the_admins_other_changes(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "controllers.json"
    write(path, [entry("a", api_key="a-key-" + "k" * 20)])
    hub, app, settings = file_hub(db, tmp_path, path)
    async with app.router.lifespan_context(app):
        watch = ControllersFileWatch(hub.controllers, path, 1.0)
        # The admin moved it, raised its priority, and drains it.
        async with db.session() as session:
            row = await session.get(ControllerModel, "a")
            assert row is not None
            row.url, row.priority, row.enabled, row.draining = "http://a2.invalid:8001", 9, False, True

        write(path, [entry("a", weight=40, api_key="a-key-" + "k" * 20)])
        await looked(watch)
        a = await controller(db, "a")
        assert (a.url, a.priority, a.weight, a.enabled, a.draining) == ("http://a2.invalid:8001", 9, 40, False, True)

        # A new key alone changes no column; it is presented from now on, and audited without its value.
        write(path, [entry("a", weight=40, api_key="a-new-" + "n" * 20)])
        await looked(watch)
        assert (await controller(db, "a")).updated_at == a.updated_at
        assert settings.key_for("a") == "a-new-" + "n" * 20
        [changed] = [e for e in await audit_rows(db) if "api_key" in e.details.get("changes", {})]
        assert changed.target == "a" and changed.details["changes"] == {"api_key": "changed"}
        assert "n" * 20 not in json.dumps(changed.details)

        # Enabling it in the file does not end the drain under way.
        write(path, [entry("a", weight=40, enabled=False, api_key="a-new-" + "n" * 20)])
        await looked(watch)
        write(path, [entry("a", weight=40, enabled=True, api_key="a-new-" + "n" * 20)])
        await looked(watch)
        assert (await controller(db, "a")).enabled is False


async def test_a_reload_the_database_breaks_off_is_retried(db: Database, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "controllers.json"
    write(path, [entry("a")])
    hub, app, settings = file_hub(db, tmp_path, path)
    async with app.router.lifespan_context(app):
        watch = ControllersFileWatch(hub.controllers, path, 1.0)
        apply = hub.controllers._apply_entry
        failures = {"c"}

        async def failing(e: Any, trigger: str, previous: Any) -> None:
            if e.id in failures:
                failures.discard(e.id)
                raise ConnectionError("the database went away")
            await apply(e, trigger, previous)

        monkeypatch.setattr(hub.controllers, "_apply_entry", failing)
        write(path, [entry("a"), entry("b", api_key="b-key-" + "k" * 20), entry("c", api_key="c-key-" + "k" * 20)])
        await watch.run_once()
        with pytest.raises(ConnectionError):
            await watch.run_once()
        # What was applied stays so, in the table and in memory; what was not is not presented.
        assert set(await rows(db)) == {"a", "b"}
        assert (settings.key_for("b"), settings.key_for("c")) == ("b-key-" + "k" * 20, KEY)
        await watch.run_once()  # the same version, tried again
        assert set(await rows(db)) == {"a", "b", "c"} and settings.key_for("c") == "c-key-" + "k" * 20


async def test_two_replicas_reloading_together_record_each_change_once(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "controllers.json"
    write(path, [entry("a")])
    hub, app, _ = file_hub(db, tmp_path, path)
    other, other_app, _ = file_hub(db, tmp_path, path)
    async with app.router.lifespan_context(app), other_app.router.lifespan_context(other_app):
        write(path, [entry("a", weight=5), *(entry(f"n{i}") for i in range(8))])
        assert await asyncio.gather(hub.controllers.reload("SIGHUP"), other.controllers.reload("SIGHUP")) == [
            True, True]
        assert set(await rows(db)) == {"a", *(f"n{i}" for i in range(8))}
        events = [(e.target, e.details["action"]) for e in await audit_rows(db) if e.details["trigger"] == "SIGHUP"]
        assert sorted(events) == sorted([("a", "updated"), *((f"n{i}", "registered") for i in range(8))])


async def test_a_controller_the_file_dropped_goes_at_a_later_start(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "controllers.json"
    write(path, [entry("a"), entry("b")])
    hub, app, _ = file_hub(db, tmp_path, path)
    async with app.router.lifespan_context(app):
        async with db.session() as session:
            owner, _ = await create_user(session, "owner")
            session.add(ServiceModel(id="s1", name="held", owner_id=owner.id, repo="r", spec={}, controller_id="b"))
        write(path, [entry("a")])
        await hub.controllers.reload("SIGHUP")
        assert (await rows(db))["b"][1] is False  # disabled and kept
    async with db.session() as session:
        await session.delete(await session.get(ServiceModel, "s1"))
    # A restarted hub, and an entry removed while no hub ran: both go at its start.
    write(path, [])
    hub, app, _ = file_hub(db, tmp_path, path)
    async with app.router.lifespan_context(app):
        assert await rows(db) == {}


async def test_a_deleted_controller_does_not_come_back_by_its_heartbeats(db: Database) -> None:
    async with key_hub(db) as hub:
        r = await hub.beat("ctl-new", KEY, heartbeat("ctl-new", [], url="http://ctl-new.test:8001"))
        assert r.status_code == 200, r.text
        assert (await hub.client.delete("/api/admin/controllers/ctl-new")).status_code == 204
        for cid in ("ctl-new", "ctl-x"):
            if cid == "ctl-x":
                assert (await hub.client.delete("/api/admin/controllers/ctl-x")).status_code == 204
            r = await hub.beat(cid, KEY, heartbeat(cid, [], url=f"http://{cid}.test:8001"))
            assert (r.status_code, r.json()["error"]["code"]) == (404, "CONTROLLER_DELETED"), r.text
            assert (await hub.client.get(f"/api/admin/controllers/{cid}")).status_code == 404
        # Registered again by an admin, it beats as any.
        r = await hub.client.post("/api/admin/controllers", json={"id": "ctl-new", "url": "http://ctl-new.test:8001"})
        assert r.status_code == 201, r.text
        assert (await hub.beat("ctl-new", KEY, heartbeat("ctl-new", []))).status_code == 200


async def test_a_delete_waits_for_a_placement_under_way_and_sees_it(cluster: Cluster) -> None:
    """A placement's registry row, inserted and not yet committed, is not lost by a DELETE running beside it."""
    cpu2 = cluster.controller_ids[2]
    async with cluster.db.session() as session:
        owner, _ = await create_user(session, "placer")
        session.add(ServiceModel(id="placed", name="placed", owner_id=owner.id, repo="r", spec={}))
    placing = cluster.db.session()
    session = await placing.__aenter__()
    values = {c.key: None for c in ContainerRegistryModel.__table__.columns}
    now = utcnow()
    values.update(id="row1", service_id="placed", controller_id=cpu2, container_name="placed-1", image="i",
                  status="creating", epoch=1, health="unknown", health_restarts=0, memory_bytes=0, cpu_limit=0.0,
                  gpu_devices=[], serving=False, created_at=now, updated_at=now, place_on=cpu2)
    assert (await session.execute(sql.INSERT_ROW_IF_PLACEABLE, values)).rowcount == 1  # type: ignore[attr-defined]
    deleting = asyncio.create_task(cluster.hub.delete(f"/api/admin/controllers/{cpu2}"))

    async def blocked() -> bool:
        async with cluster.db.session() as s:
            return bool(await s.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'")))

    await eventually(blocked, 10, "the DELETE waiting for the placement's lock")
    await placing.__aexit__(None, None, None)  # the placement commits
    r = await deleting
    assert (r.status_code, r.json()["error"]["code"]) == (409, "CONTROLLER_HAS_SERVICES"), r.text
    assert r.json()["error"]["details"]["services"] == ["placed"]
