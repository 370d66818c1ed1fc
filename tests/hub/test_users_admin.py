"""Users at run time through the hub's API, on real PostgreSQL and the real Docker engine: admins list, show,
disable and delete users (their services deleted through the lifecycle or handed to another user, the
admin's explicit choice), set their quotas (service replicas, GPUs, memory) and manage any user's tokens;
each user manages their own tokens. Every refusal changes nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select

from examples.images import EXAMPLE_IMAGE
from hub.errors import Forbidden
from hub.models import ApiTokenModel, JobModel, OperationModel, ServiceModel, UserModel
from hub.services.lifecycle import replace as replace_module
from hub.services.users import UserAuth
from tests.hub.conftest import Cluster
from tests.support.poll import eventually

SPEC = {"name": "svc", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


async def create(cluster: Cluster, who: dict[str, str], owner: str, name: str, **spec: Any) -> dict[str, Any]:
    r = await cluster.hub.post(f"/api/{owner}/lab/services", json={**SPEC, "name": name, **spec}, headers=who)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def refused(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    return r.json()["error"]  # type: ignore[no-any-return]


def running(cluster: Cluster, sid: str) -> list[str]:
    return [c["Id"] for c in cluster.docker.api.containers(filters={"label": [f"mmanager.service={sid}"],
                                                                     "status": "running"})]


async def user_row(cluster: Cluster, username: str) -> UserModel | None:
    async with cluster.db.session() as session:
        return await session.scalar(select(UserModel).where(UserModel.username == username))


async def owners(cluster: Cluster) -> dict[str, int]:
    async with cluster.db.session() as session:
        return dict((await session.execute(select(ServiceModel.name, ServiceModel.owner_id))).all())


async def test_admins_list_show_and_disable_users_whose_tokens_are_then_refused(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    sid = (await create(cluster, alice, "alice", "kept"))["id"]
    [row] = [u for u in (await cluster.hub.get("/api/admin/users")).json() if u["username"] == "alice"]
    assert row["is_admin"] is False and row["disabled"] is False and row["services"] == 1
    assert row["active_tokens"] == 1 and row["created_at"]
    # Their own quotas are the hub's defaults (null); the limits in force, and what their one service asks.
    assert row["quotas"] == {"services": None, "gpus": None, "memory_bytes": None}
    assert row["limits"] == {"services": 5, "gpus": None, "memory_bytes": None}
    assert row["usage"] == {"services": 1, "gpus": 0, "memory_bytes": 16 * 1024**2}
    assert (await cluster.hub.get("/api/admin/users/alice")).json() == row
    refused(await cluster.hub.get("/api/admin/users/nobody"), 404, "USER_NOT_FOUND")
    refused(await cluster.hub.get("/api/admin/users", headers=alice), 403, "ADMIN_REQUIRED")
    refused(await cluster.hub.patch("/api/admin/users/alice", json={"disabled": True}, headers=alice),
            403, "ADMIN_REQUIRED")

    # Refusals change nothing: an admin disabling themselves, an empty patch, a bad quota.
    before = (await cluster.hub.get("/api/admin/users")).json()
    refused(await cluster.hub.patch("/api/admin/users/admin", json={"disabled": True}), 409, "CANNOT_DISABLE_SELF")
    refused(await cluster.hub.patch("/api/admin/users/alice", json={}), 422, "EMPTY_PATCH")
    refused(await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"gpus": -1}}), 422,
            "VALIDATION_ERROR")
    refused(await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"memory": "lots"}}), 422,
            "VALIDATION_ERROR")
    refused(await cluster.hub.patch("/api/admin/users/nobody", json={"disabled": True}), 404, "USER_NOT_FOUND")
    assert (await cluster.hub.get("/api/admin/users")).json() == before

    # Another replica remembered alice's token a moment ago (its clock is the test's).
    clock = [0.0]
    other = UserAuth(cluster.db, ttl=1.0, clock=lambda: clock[0])
    await other.identity(cluster.tokens["alice"])
    assert (await cluster.hub.get("/api/me", headers=alice)).status_code == 200
    r = await cluster.hub.patch("/api/admin/users/alice", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True and r.json()["disabled_at"], r.text
    # Refused at once on the replica that disabled her, with a code that says why; on the other within its TTL.
    refused(await cluster.hub.get("/api/me", headers=alice), 403, "USER_DISABLED")
    refused(await cluster.hub.get(f"/api/services/{sid}", headers=alice), 403, "USER_DISABLED")

    # The other replica still takes it from its memory until its TTL has passed, then asks and refuses it.
    clock[0] = 0.99
    assert (await other.identity(cluster.tokens["alice"])).username == "alice"
    clock[0] = 1.0
    with pytest.raises(Forbidden) as caught:
        await other.identity(cluster.tokens["alice"])
    assert caught.value.code == "USER_DISABLED"
    # Her service keeps running.
    assert running(cluster, sid) and (await cluster.hub.get(f"/api/services/{sid}")).json()["status"] == "running"
    r = await cluster.hub.patch("/api/admin/users/alice", json={"disabled": False})
    assert r.status_code == 200 and r.json()["disabled"] is False
    assert (await cluster.hub.get("/api/me", headers=alice)).json()["username"] == "alice"


async def test_tokens_are_named_listed_rotated_revoked_and_their_use_recorded(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    r = await cluster.hub.post("/api/me/tokens", json={"name": "laptop"}, headers=alice)
    assert r.status_code == 201, r.text
    laptop = r.json()
    assert laptop["name"] == "laptop" and laptop["token"].startswith(laptop["prefix"])
    as_laptop = cluster.as_user(laptop["token"])
    listed = (await cluster.hub.get("/api/me/tokens", headers=alice)).json()
    assert [t["name"] for t in listed] == ["initial", "laptop"]
    # Never the token itself, nor its hash.
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert laptop["token"] not in (await cluster.hub.get("/api/me/tokens", headers=alice)).text
    async with cluster.db.session() as session:
        assert await session.scalar(select(ApiTokenModel.token_hash).where(ApiTokenModel.id == laptop["id"])) \
            != laptop["token"]

    # Its first use is recorded (the flusher writes it; at most once a minute after that).
    assert (await cluster.hub.get("/api/me", headers=as_laptop)).status_code == 200

    async def last_used() -> Any:
        [token] = [t for t in (await cluster.hub.get("/api/me/tokens", headers=alice)).json()
                   if t["id"] == laptop["id"]]
        return token["last_used_at"]

    await cluster.parts.users.flush()
    first = await last_used()
    assert first is not None
    for _ in range(5):
        assert (await cluster.hub.get("/api/me", headers=as_laptop)).status_code == 200
    await cluster.parts.users.flush()
    assert await last_used() == first

    # Bob cannot see, revoke or rotate alice's tokens: they answer as tokens nobody has, and still work.
    for method, path in (("DELETE", f"/api/me/tokens/{laptop['id']}"), ("POST", f"/api/me/tokens/{laptop['id']}/rotate"),
                         ("DELETE", "/api/me/tokens/999999"), ("POST", "/api/me/tokens/999999/rotate")):
        refused(await cluster.hub.request(method, path, headers=bob), 404, "TOKEN_NOT_FOUND")
    assert [t["name"] for t in (await cluster.hub.get("/api/me/tokens", headers=bob)).json()] == ["initial"]
    assert (await cluster.hub.get("/api/me", headers=as_laptop)).status_code == 200
    for name in ("", "a" * 65, "no spaces"):
        refused(await cluster.hub.post("/api/me/tokens", json={"name": name}, headers=alice), 422, "VALIDATION_ERROR")

    # Rotate: a new token of the same name, the old one refused at once.
    r = await cluster.hub.post(f"/api/me/tokens/{laptop['id']}/rotate", headers=alice)
    assert r.status_code == 201, r.text
    rotated = r.json()
    assert rotated["name"] == "laptop" and rotated["id"] != laptop["id"] and rotated["token"] != laptop["token"]
    refused(await cluster.hub.get("/api/me", headers=as_laptop), 401, "UNAUTHORIZED")
    assert (await cluster.hub.get("/api/me", headers=cluster.as_user(rotated["token"]))).status_code == 200
    refused(await cluster.hub.post(f"/api/me/tokens/{laptop['id']}/rotate", headers=alice), 409, "TOKEN_REVOKED")

    # An admin on alice's tokens: listed, created, revoked.
    listed = (await cluster.hub.get("/api/admin/users/alice/tokens")).json()
    assert [(t["name"], t["revoked_at"] is not None) for t in listed] == [
        ("initial", False), ("laptop", True), ("laptop", False)]
    refused(await cluster.hub.get("/api/admin/users/nobody/tokens"), 404, "USER_NOT_FOUND")
    r = await cluster.hub.post("/api/admin/users/alice/tokens", json={"name": "ci"})
    assert r.status_code == 201, r.text
    ci = r.json()
    assert (await cluster.hub.get("/api/me", headers=cluster.as_user(ci["token"]))).json()["username"] == "alice"
    # Alice's token id under bob's name is no token of bob's.
    refused(await cluster.hub.delete(f"/api/admin/users/bob/tokens/{ci['id']}"), 404, "TOKEN_NOT_FOUND")
    assert (await cluster.hub.delete(f"/api/admin/users/alice/tokens/{ci['id']}")).status_code == 204
    refused(await cluster.hub.get("/api/me", headers=cluster.as_user(ci["token"])), 401, "UNAUTHORIZED")
    assert (await cluster.hub.get("/api/admin/users/alice")).json()["active_tokens"] == 2
    # A user revokes their own token, the one they call with included.
    assert (await cluster.hub.delete(f"/api/me/tokens/{rotated['id']}", headers=alice)).status_code == 204
    refused(await cluster.hub.get("/api/me", headers=cluster.as_user(rotated["token"])), 401, "UNAUTHORIZED")


async def test_a_users_delete_is_refused_without_a_choice_and_nothing_changes(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    await cluster.user("carol")
    a = await create(cluster, alice, "alice", "same")
    await create(cluster, bob, "bob", "same")
    before = (await cluster.hub.get("/api/admin/users")).json(), await owners(cluster)

    error = refused(await cluster.hub.delete("/api/admin/users/alice"), 409, "USER_HAS_SERVICES")
    assert error["details"]["services"] == [{"id": a["id"], "name": "same"}]
    # To someone who owns a service of the same name: nothing moved.
    error = refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "bob"}),
                    409, "SERVICE_NAME_CLASH")
    assert error["details"]["names"] == ["same"]
    refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer"}), 422,
            "VALIDATION_ERROR")
    refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "alice"}), 422,
            "VALIDATION_ERROR")
    refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "nobody"}),
            404, "USER_NOT_FOUND")
    refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "keep"}), 422, "VALIDATION_ERROR")
    assert (await cluster.hub.patch("/api/admin/users/carol", json={"disabled": True})).status_code == 200
    refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "carol"}),
            409, "USER_DISABLED")
    assert (await cluster.hub.patch("/api/admin/users/carol", json={"disabled": False})).status_code == 200
    refused(await cluster.hub.delete("/api/admin/users/admin"), 409, "CANNOT_DELETE_SELF")
    refused(await cluster.hub.delete("/api/admin/users/nobody"), 404, "USER_NOT_FOUND")
    refused(await cluster.hub.delete("/api/admin/users/bob", headers=alice), 403, "ADMIN_REQUIRED")
    # A job of hers that may still run: cancel it first.
    async with cluster.db.session() as session:
        owner = await session.scalar(select(UserModel.id).where(UserModel.username == "alice"))
        job = JobModel(name="queued", owner_id=owner, spec={"name": "queued", "image": "busybox"}, needs=[])
        session.add(job)
        await session.flush()
        job_id = job.id
    error = refused(await cluster.hub.delete("/api/admin/users/alice", params={"services": "delete"}), 409,
                    "USER_HAS_JOBS")
    assert error["details"]["jobs"] == [job_id]
    assert ((await cluster.hub.get("/api/admin/users")).json(), await owners(cluster)) == before
    assert running(cluster, a["id"]) and (await cluster.hub.get("/api/me", headers=alice)).status_code == 200


async def test_a_users_delete_deletes_their_services_through_the_lifecycle(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    one = await create(cluster, alice, "alice", "one")
    two = await create(cluster, alice, "alice", "two", replicas=2)
    assert len(running(cluster, two["id"])) == 2
    r = await cluster.hub.delete("/api/admin/users/alice", params={"services": "delete"})
    assert r.status_code == 200, r.text
    assert r.json() == {"username": "alice", "services": "delete", "deleted": ["one", "two"], "transferred": [],
                        "to": None}
    # Their containers are removed by their controllers, not left running without a service.
    assert cluster.containers(**{"mmanager.service": one["id"]}) == []
    assert cluster.containers(**{"mmanager.service": two["id"]}) == []
    assert await user_row(cluster, "alice") is None
    refused(await cluster.hub.get("/api/me", headers=alice), 401, "UNAUTHORIZED")
    async with cluster.db.session() as session:
        ops = (await session.execute(select(OperationModel.service_id, OperationModel.operation, OperationModel.status,
                                            OperationModel.actor).where(OperationModel.operation == "delete"))).all()
    assert sorted(ops) == sorted([(one["id"], "delete", "succeeded", "admin"),
                                  (two["id"], "delete", "succeeded", "admin")])
    # A user without services needs no choice.
    await cluster.user("dave")
    assert (await cluster.hub.delete("/api/admin/users/dave")).json()["deleted"] == []


async def test_a_users_delete_can_hand_their_services_to_another_user(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    one = await create(cluster, alice, "alice", "one")
    containers = running(cluster, one["id"])
    r = await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "bob"})
    assert r.status_code == 200, r.text
    assert r.json() == {"username": "alice", "services": "transfer", "deleted": [], "transferred": ["one"],
                        "to": "bob"}
    # Bob owns it now, its container untouched; alice is gone.
    mine = (await cluster.hub.get("/api/services", headers=bob)).json()
    assert [(s["id"], s["owner"]) for s in mine] == [(one["id"], "bob")]
    assert running(cluster, one["id"]) == containers
    assert await user_row(cluster, "alice") is None
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": one["id"],
                                                                  "operation": "transfer"})).json()
    assert [(o["status"], o["actor"], o["details"]) for o in ops] == [
        ("succeeded", "admin", {"from": "alice", "to": "bob"})]


async def test_an_admin_cannot_remove_themselves_so_an_admin_remains(cluster: Cluster) -> None:
    other = await cluster.user("root2", admin=True)
    assert (await cluster.hub.patch("/api/admin/users/admin", json={"disabled": True}, headers=other)).status_code == 200
    refused(await cluster.hub.delete("/api/admin/users/root2", headers=other), 409, "CANNOT_DELETE_SELF")
    refused(await cluster.hub.patch("/api/admin/users/root2", json={"disabled": True}, headers=other), 409,
            "CANNOT_DISABLE_SELF")
    assert (await cluster.hub.get("/api/admin/users/root2", headers=other)).json()["disabled"] is False


async def test_per_user_quotas_on_services_gpus_and_memory(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    r = await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"memory": "48MB", "gpus": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["quotas"] == {"services": None, "gpus": 0, "memory_bytes": 48 * 1024**2}
    assert r.json()["limits"] == {"services": 5, "gpus": 0, "memory_bytes": 48 * 1024**2}

    # Memory: concurrent creates of 16MB each under a quota of 48MB: exactly three.
    results = await asyncio.gather(*(cluster.hub.post("/api/alice/lab/services", json={**SPEC, "name": f"m{i}"},
                                                      headers=alice) for i in range(5)))
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 201, 409, 409], [r.text for r in results]
    error = refused(next(r for r in results if r.status_code == 409), 409, "QUOTA_EXCEEDED")["details"]
    assert error == {"quota": "memory", "current": 48 * 1024**2, "requested": 64 * 1024**2,
                     "limit": 48 * 1024**2}
    made = [r.json() for r in results if r.status_code == 201]
    sid = made[0]["id"]
    # Growth refused: a scale, an update asking for more, a spec without a memory limit.
    refused(await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 2}, headers=alice), 409,
            "QUOTA_EXCEEDED")
    refused(await cluster.hub.patch(f"/api/services/{sid}", json={"resources": {"memory_limit": "32MB"}},
                                    headers=alice), 409, "QUOTA_EXCEEDED")
    await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"memory": None}})
    await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"memory": "1G"}})
    refused(await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "name": "nolimit", "resources": {}},
                                   headers=alice), 422, "MEMORY_LIMIT_REQUIRED")
    # GPUs: none for her.
    r = await cluster.hub.post("/api/alice/lab/services", headers=alice, json={
        **SPEC, "name": "gpu", "resources": {"memory_limit": "16MB", "gpu_count": 1}})
    assert refused(r, 409, "QUOTA_EXCEEDED")["details"]["quota"] == "gpus"
    # Services (replicas): her own quota of 3 is already reached; lowering it below stops nothing.
    r = await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"services": 2}})
    assert r.json()["usage"]["services"] == 3 and r.json()["limits"]["services"] == 2
    assert all(running(cluster, s["id"]) for s in made)
    r = await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "name": "more"}, headers=alice)
    assert refused(r, 409, "QUOTA_EXCEEDED")["details"] == {"quota": "services", "current": 3, "requested": 4,
                                                            "limit": 2}
    # Null: the hub's default again; an admin's own quota binds them too.
    r = await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"services": None, "gpus": None}})
    assert r.json()["quotas"] == {"services": None, "gpus": None, "memory_bytes": 1024**3}
    assert (await cluster.hub.patch("/api/admin/users/admin", json={"quotas": {"services": 0}})).status_code == 200
    refused(await cluster.hub.post("/api/admin/lab/services", json={**SPEC, "name": "mine"}), 409, "QUOTA_EXCEEDED")


async def test_two_admins_disabling_each_other_at_once_leave_one_enabled(cluster: Cluster) -> None:
    root2 = await cluster.user("root2", admin=True)
    # Both pass authentication before either change commits; the second to take the admins' locks finds
    # itself the last enabled admin's target.
    first, second = await asyncio.gather(
        cluster.hub.patch("/api/admin/users/root2", json={"disabled": True}),
        cluster.hub.patch("/api/admin/users/admin", json={"disabled": True}, headers=root2))
    assert sorted([first.status_code, second.status_code]) == [200, 409], (first.text, second.text)
    refused(first if first.status_code == 409 else second, 409, "LAST_ADMIN")
    async with cluster.db.session() as session:
        enabled = list(await session.scalars(select(UserModel.username).where(
            UserModel.is_admin.is_(True), UserModel.disabled_at.is_(None))))
    assert len(enabled) == 1


async def test_services_with_named_volumes_are_not_handed_over(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    await cluster.user("bob")
    kept = await create(cluster, alice, "alice", "plain")
    data = await create(cluster, alice, "alice", "data", volumes={"store": "/data"})
    before = await owners(cluster)
    r = await cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "bob"})
    # Its Docker volume is named after its owner: under bob it would start on an empty one. Nothing moves.
    assert refused(r, 409, "SERVICE_HAS_VOLUMES")["details"] == {
        "services": [{"id": data["id"], "name": "data", "volumes": ["store"]}]}
    assert await owners(cluster) == before and await user_row(cluster, "alice") is not None
    assert running(cluster, kept["id"]) and running(cluster, data["id"])


async def test_two_deletes_handing_services_to_each_other_do_not_deadlock(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    await create(cluster, alice, "alice", "a1")
    await create(cluster, bob, "bob", "b1")
    results = await asyncio.gather(
        cluster.hub.delete("/api/admin/users/alice", params={"services": "transfer", "to": "bob"}),
        cluster.hub.delete("/api/admin/users/bob", params={"services": "transfer", "to": "alice"}))
    # One wins; the other finds its receiver gone (never a deadlock's 500).
    assert sorted(r.status_code for r in results) == [200, 404], [r.text for r in results]
    refused(next(r for r in results if r.status_code == 404), 404, "USER_NOT_FOUND")
    kept = (await cluster.hub.get("/api/admin/users")).json()
    [survivor] = [u for u in kept if u["username"] in ("alice", "bob")]
    assert survivor["services"] == 2


async def test_an_update_growing_memory_and_a_create_at_once_stay_within_the_quota(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = await cluster.user("alice")
    assert (await cluster.hub.patch("/api/admin/users/alice", json={"quotas": {"memory": "48MB"}})).status_code == 200
    sid = (await create(cluster, alice, "alice", "s0"))["id"]
    # An update that keeps the count and drops the memory limit: refused (it could use any amount).
    refused(await cluster.hub.patch(f"/api/services/{sid}", json={"resources": {"memory_limit": None}},
                                    headers=alice), 422, "MEMORY_LIMIT_REQUIRED")
    # Each fits alone (16MB -> 32MB; 16MB + 32MB); together they would make 64MB. The update passes its check
    # when asked; the create commits while the update's new copy starts (held there by the test); the update
    # is then checked again where its spec is written, and refused.
    create_done = asyncio.Event()
    held = replace_module.hold_quota

    async def after_the_create(*args: Any, **kwargs: Any) -> Any:
        await create_done.wait()
        return await held(*args, **kwargs)

    monkeypatch.setattr(replace_module, "hold_quota", after_the_create)
    r = await cluster.hub.patch(f"/api/services/{sid}", params={"wait": "false"},
                                json={"resources": {"memory_limit": "32MB"}}, headers=alice)
    assert r.status_code == 202, r.text
    op_id = r.json()["id"]
    made = await cluster.hub.post("/api/alice/lab/services", headers=alice, json={
        **SPEC, "name": "s1", "resources": {"cpu_limit": 0.1, "memory_limit": "32MB"}})
    assert made.status_code == 201, made.text
    create_done.set()

    async def ended() -> Any:
        op = (await cluster.hub.get(f"/api/operations/{op_id}", headers=alice)).json()
        return op if op["status"] in ("succeeded", "failed") else None

    op = await eventually(ended, within=60.0, what="the update ends")
    assert op["status"] == "failed" and "QUOTA_EXCEEDED" in json.dumps(op), op
    usage = (await cluster.hub.get("/api/admin/users/alice")).json()["usage"]
    assert usage["memory_bytes"] == 48 * 1024**2, usage
    # The old copy keeps serving, the new one is gone, and the spec is the old one.
    assert len(running(cluster, sid)) == 1
    service = (await cluster.hub.get(f"/api/services/{sid}")).json()
    assert service["status"] == "running" and service["spec"]["resources"]["memory_limit"] == "16MB", service
