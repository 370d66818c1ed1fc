"""Pipelines on real PostgreSQL through the hub's API in process: a submit makes one job per step in one
transaction (their needs and inputs rewritten to job ids), bad specs are refused with 4xx and change nothing,
another user's pipelines are not seen, and cancel, retry and the derived status do what docs/API.md says.

The one controller registered is disabled and out of reach (as after an admin took it out), so the jobs are
accepted (it could run them) but none starts: the steps' ends are written as the jobs queue writes them, and the
pipeline is read back through the API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.deps import Hub
from hub.models import (
    ArtifactModel,
    ControllerModel,
    JobAttemptModel,
    JobModel,
    OperationModel,
    PipelineModel,
    UserModel,
    utcnow,
)
from hub.services.jobs.watch import Collected
from hub.services.users import create_user
from tests.conftest import emptied
from tests.hub.conftest import HUB_KEY, KEY, Router


class Lab:
    """The hub of this module, seen by one test: its users' names are the test's own (``alice`` is
    ``names["alice"]``), so the tests share one hub and its database without seeing each other's rows."""

    def __init__(self, client: httpx.AsyncClient, db: Database, app: Hub, run: str) -> None:
        self.hub = client
        self.db = db
        self.app = app
        self.run = run
        self.names: dict[str, str] = {}

    async def user(self, name: str, admin: bool = False) -> dict[str, str]:
        self.names[name] = f"{name}-{self.run}"
        async with self.db.session() as session:
            _, token = await create_user(session, self.names[name], admin)
        return {"Authorization": f"Bearer {token}"}

    async def upload(self, owner: str, name: str) -> str:
        """An uploaded artifact's row, as the artifact store leaves it."""
        async with self.db.session() as session:
            owner_id = await session.scalar(select(UserModel.id).where(UserModel.username == self.names[owner]))
            artifact = ArtifactModel(owner_id=owner_id, name=name, digest="sha256:" + "0" * 64, size=1)
            session.add(artifact)
            await session.flush()
            return artifact.id

    async def set_step(self, pipeline: dict[str, Any], step: str, status: str) -> None:
        """A step's job as the jobs queue leaves it: running on the (down) controller with a new attempt, or
        ended so, with the attempt that ran it (a new one when it was not running)."""
        [job] = [j for j in pipeline["steps"] if j["step"] == step]
        now = utcnow()
        async with self.db.session() as session:
            row = (await session.scalars(select(JobModel).where(JobModel.id == job["id"])
                                         .with_for_update(of=JobModel))).unique().one()
            live = await session.scalar(select(JobAttemptModel).where(
                JobAttemptModel.job_id == row.id, JobAttemptModel.number == row.epoch,
                JobAttemptModel.status.in_(("starting", "running"))))
            if live is None or status == "running":
                row.attempts = row.epoch = row.attempts + 1
                live = JobAttemptModel(job_id=row.id, number=row.epoch, controller_id="down", started_at=now)
                session.add(live)
            live.status = status
            row.status, row.started_at, row.retries = status, now, 0
            if status != "running":
                live.finished_at = row.finished_at = now
                row.exit_code = live.exit_code = 0 if status == "succeeded" else 1

    async def count(self, model: Any, *where: Any) -> int:
        async with self.db.session() as session:
            return await session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    async def rows(self) -> tuple[int, int, int]:
        """This test's users' pipelines, jobs and jobs' operations."""
        mine = select(UserModel.id).where(UserModel.username.in_(self.names.values()))
        return (await self.count(PipelineModel, PipelineModel.owner_id.in_(mine)),
                await self.count(JobModel, JobModel.owner_id.in_(mine)),
                await self.count(OperationModel, OperationModel.job_id.is_not(None),
                                 OperationModel.actor.in_(self.names.values())))


@pytest.fixture(scope="module")
async def hub_app(pg_url: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, Database, Hub]]:
    """One hub for the module, on an emptied database with one controller registered that could run every
    step here but is disabled and out of reach."""
    db = await emptied(Database(pg_url))
    async with db.session() as session:
        session.add(ControllerModel(id="down", url="http://down.test:8001", server_type="cpu", enabled=False,
                                    status="unreachable", cpu_cores=8, memory_total_gb=16, max_containers=10))
    settings = HubSettings(database_url=db.url, api_key=KEY, hub_key=HUB_KEY, controllers="[]",
                           artifact_store=tmp_path_factory.mktemp("artifacts"))
    hub = build_hub(settings, db=Database(db.url), transport=Router())
    app = create_app(settings, hub=hub)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                     timeout=60) as client:
            yield client, db, hub
    await db.dispose()


@pytest.fixture
def lab(hub_app: tuple[httpx.AsyncClient, Database, Hub]) -> Lab:
    return Lab(*hub_app, uuid.uuid4().hex[:8])


def chain(data: str) -> dict[str, Any]:
    """Three steps, each taking the one before's output: TSV to JSONL, features, the enhanced dataset."""
    return {"name": "features", "steps": [
        {"name": "to-jsonl", "image": "img:1", "command": ["convert"], "inputs": [{"artifact": data, "path": "in.tsv"}],
         "retries": 2},
        {"name": "features", "image": "img:1", "command": ["features"],
         "inputs": [{"step": "to-jsonl", "path": "records.jsonl", "as": "records.jsonl"}]},
        {"name": "enhance", "image": "img:1", "command": ["enhance"], "needs": ["to-jsonl"],
         "inputs": [{"step": "features", "path": "features.jsonl"}]},
    ]}


async def submit(lab: Lab, who: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    r = await lab.hub.post("/api/pipelines", json=spec, headers=who)
    assert r.status_code == 201, r.text
    return r.json()


async def read(lab: Lab, who: dict[str, str], pid: str) -> dict[str, Any]:
    r = await lab.hub.get(f"/api/pipelines/{pid}", headers=who)
    assert r.status_code == 200, r.text
    return r.json()


def stable(pipeline: dict[str, Any]) -> dict[str, Any]:
    """The pipeline without what the queue rewrites while its steps wait (why they wait)."""
    return {**pipeline, "steps": [{k: v for k, v in j.items() if k not in ("status_message", "wait_reasons")}
                                  for j in pipeline["steps"]]}


def statuses(pipeline: dict[str, Any]) -> dict[str, str]:
    return {j["step"]: j["status"] for j in pipeline["steps"]}


async def test_submit_makes_a_job_per_step_with_needs_and_inputs_rewritten(lab: Lab) -> None:
    alice = await lab.user("alice")
    data = await lab.upload("alice", "in.tsv")
    p = await submit(lab, alice, chain(data))
    assert p["status"] == "pending" and p["owner"] == lab.names["alice"] and p["finished_at"] is None
    assert [j["step"] for j in p["steps"]] == ["to-jsonl", "features", "enhance"]
    ids = {j["step"]: j["id"] for j in p["steps"]}
    tsv, features, enhance = p["steps"]
    assert all(j["status"] == "pending" and j["pipeline_id"] == p["id"] and j["owner"] == lab.names["alice"]
               for j in p["steps"])
    assert tsv["needs"] == [] and tsv["retries"] == 2
    assert tsv["spec"]["inputs"] == [{"artifact": data, "path": "in.tsv"}]
    assert features["needs"] == [ids["to-jsonl"]]
    assert features["spec"]["inputs"] == [{"job": ids["to-jsonl"], "path": "records.jsonl", "as": "records.jsonl"}]
    assert sorted(enhance["needs"]) == sorted([ids["to-jsonl"], ids["features"]])
    assert enhance["spec"]["inputs"] == [{"job": ids["features"], "path": "features.jsonl", "as": None}]
    assert "needs" not in enhance["spec"] and enhance["spec"]["name"] == "enhance"
    # The rows say the same, and each job's submit is in the operation history.
    async with lab.db.session() as session:
        jobs = {j.step: j for j in (await session.scalars(select(JobModel).where(JobModel.pipeline_id == p["id"])))
                .unique()}
        ops = list(await session.scalars(select(OperationModel).where(OperationModel.job_id.in_(ids.values()))))
    assert {s: (j.id, j.needs, j.pipeline_id) for s, j in jobs.items()} == {
        s: (ids[s], next(x["needs"] for x in p["steps"] if x["step"] == s), p["id"]) for s in ids}
    assert sorted((o.job_id, o.operation, o.actor) for o in ops) == sorted(
        (i, "job_submit", lab.names["alice"]) for i in ids.values())
    assert stable(await read(lab, alice, p["id"])) == stable(p)
    # The spec is kept as given.
    assert p["spec"]["steps"][2]["inputs"] == [{"step": "features", "path": "features.jsonl", "as": None}]


@pytest.mark.parametrize(("steps", "status", "code", "details"), [
    ([{"name": "a", "needs": ["c"]}, {"name": "b", "needs": ["a"]}, {"name": "c", "needs": ["b"]}],
     422, "PIPELINE_CYCLE", {"cycle": ["a", "c", "b", "a"]}),
    ([{"name": "a", "inputs": [{"step": "a", "path": "x"}]}], 422, "PIPELINE_CYCLE", {"cycle": ["a", "a"]}),
    ([{"name": "a"}, {"name": "b", "needs": ["nope"]}], 422, "UNKNOWN_STEP", [{"step": "b", "needs": "nope"}]),
    ([{"name": "a"}, {"name": "b", "inputs": [{"step": "ghost", "path": "x"}]}], 422, "UNKNOWN_STEP",
     [{"step": "b", "needs": "ghost"}]),
    ([{"name": "a", "inputs": ["0" * 32]}], 404, "ARTIFACT_NOT_FOUND", {"missing": ["0" * 32]}),
    ([{"name": "a", "inputs": [{"job": "0" * 32, "path": "x"}]}], 404, "JOB_NOT_FOUND", {"missing": ["0" * 32]}),
    ([{"name": "a"}, {"name": "a"}], 422, "VALIDATION_ERROR", None),
    # The jobs' own checks, on a step made after another: the whole pipeline is refused.
    ([{"name": "a"}, {"name": "b", "needs": ["a"], "resources": {"gpu_count": 1}}], 409, "NEVER_FITS", None),
])
async def test_a_bad_spec_is_refused_and_changes_nothing(lab: Lab, steps: list[dict[str, Any]], status: int,
                                                         code: str, details: Any) -> None:
    alice = await lab.user("alice")
    r = await lab.hub.post("/api/pipelines", json={"name": "bad", "steps": [{"image": "img", **s} for s in steps]},
                           headers=alice)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    if details is not None:
        assert r.json()["error"]["details"] == details
    assert await lab.rows() == (0, 0, 0)


async def test_another_users_pipelines_and_artifacts_are_not_seen(lab: Lab) -> None:
    alice, bob = await lab.user("alice"), await lab.user("bob")
    admin = await lab.user("root", admin=True)
    data = await lab.upload("alice", "in.tsv")
    p = await submit(lab, alice, chain(data))
    ghost = uuid.uuid4().hex
    for method, path in (("GET", "/api/pipelines/{}"), ("POST", "/api/pipelines/{}/cancel"),
                         ("POST", "/api/pipelines/{}/retry")):
        mine = await lab.hub.request(method, path.format(p["id"]), headers=bob)
        missing = await lab.hub.request(method, path.format(ghost), headers=bob)
        assert mine.status_code == 404 and mine.json()["error"]["code"] == "PIPELINE_NOT_FOUND", mine.text
        assert mine.text.replace(p["id"], ghost) == missing.text
    assert (await lab.hub.get("/api/pipelines", headers=bob)).json() == []
    # Alice's upload is no input of bob's: it answers as one that does not exist.
    r = await lab.hub.post("/api/pipelines", json=chain(data), headers=bob)
    assert r.status_code == 404 and r.json()["error"]["code"] == "ARTIFACT_NOT_FOUND", r.text
    assert await lab.rows() == (1, 3, 3)
    assert stable(await read(lab, alice, p["id"])) == stable(p)
    # An admin sees and may act on everyone's.
    assert p["id"] in [x["id"] for x in (await lab.hub.get("/api/pipelines", headers=admin)).json()]
    assert (await read(lab, admin, p["id"]))["owner"] == lab.names["alice"]
    r = await lab.hub.get("/api/pipelines", headers={"Authorization": ""})
    assert r.status_code == 401


async def test_cancel_cancels_every_unfinished_step(lab: Lab) -> None:
    alice = await lab.user("alice")
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(p, "to-jsonl", "succeeded")
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert statuses(cancelled) == {"to-jsonl": "succeeded", "features": "cancelled", "enhance": "cancelled"}
    ids = [j["id"] for j in p["steps"]]
    cancels = (OperationModel.operation == "job_cancelled", OperationModel.job_id.in_(ids))
    assert await lab.count(OperationModel, *cancels) == 2
    # Again: nothing left to cancel, answered as it is.
    again = await lab.hub.post(f"/api/pipelines/{p['id']}/cancel", headers=alice)
    assert again.status_code == 200 and again.json() == cancelled
    assert await lab.count(OperationModel, *cancels) == 2


async def test_status_follows_the_steps_and_a_failure_stops_the_steps_after_it(lab: Lab) -> None:
    alice = await lab.user("alice")
    spec = chain(await lab.upload("alice", "in.tsv"))
    spec["steps"].append({"name": "side", "image": "img:1"})  # a branch of its own
    p = await submit(lab, alice, spec)
    await lab.set_step(p, "to-jsonl", "running")
    assert (await read(lab, alice, p["id"]))["status"] == "running"
    await lab.set_step(p, "to-jsonl", "succeeded")
    await lab.set_step(p, "features", "failed")
    # The side branch may still run: the pipeline is not over, but enhance can never start.
    now = await read(lab, alice, p["id"])
    assert now["status"] == "running" and now["finished_at"] is None
    assert statuses(now) == {"to-jsonl": "succeeded", "features": "failed", "enhance": "cancelled", "side": "pending"}
    assert next(j for j in now["steps"] if j["step"] == "enhance")["status_message"]
    await lab.set_step(p, "side", "succeeded")
    done = await read(lab, alice, p["id"])
    assert done["status"] == "failed" and done["finished_at"] is not None
    failed = (await lab.hub.get("/api/pipelines", params={"status": "failed"}, headers=alice)).json()
    assert [x["id"] for x in failed] == [p["id"]]
    assert (await lab.hub.get("/api/pipelines", params={"status": "running"}, headers=alice)).json() == []


async def test_retry_reruns_the_failed_step_and_those_after_it_only(lab: Lab) -> None:
    alice = await lab.user("alice")
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(p, "to-jsonl", "running")
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "PIPELINE_RUNNING", r.text
    await lab.set_step(p, "to-jsonl", "succeeded")
    await lab.set_step(p, "features", "timed_out")
    before = await read(lab, alice, p["id"])
    assert before["status"] == "failed"
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["status"] == "running" and again["finished_at"] is None
    assert statuses(again) == {"to-jsonl": "succeeded", "features": "pending", "enhance": "pending"}
    features = next(j for j in again["steps"] if j["step"] == "features")
    # Its attempt before is kept; its retries are as at submit; the succeeded step's outputs are the input.
    assert [a["status"] for a in features["attempts"]] == ["timed_out"]
    assert features["exit_code"] is None and features["finished_at"] is None
    assert features["spec"]["inputs"][0]["job"] == before["steps"][0]["id"]
    assert again["steps"][0] == before["steps"][0]
    retried = {o for o in await lab_ops(lab, "job_retry")}
    assert retried == {features["id"], again["steps"][2]["id"]}
    assert stable(await read(lab, alice, p["id"])) == stable(again)

    await lab.set_step(again, "features", "succeeded")
    await lab.set_step(again, "enhance", "succeeded")
    done = await read(lab, alice, p["id"])
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "NOTHING_TO_RETRY", r.text


async def test_a_cancelled_pipeline_retried_runs_its_cancelled_steps(lab: Lab) -> None:
    alice = await lab.user("alice")
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.hub.post(f"/api/pipelines/{p['id']}/cancel", headers=alice)
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 200, r.text
    # Nothing ever started: pending again, as at submit.
    assert r.json()["status"] == "pending"
    assert set(statuses(r.json()).values()) == {"pending"}
    assert [j["retries"] for j in r.json()["steps"]] == [2, 0, 0]


async def test_list_filters_and_pages(lab: Lab) -> None:
    alice = await lab.user("alice")
    data = await lab.upload("alice", "in.tsv")
    made = [await submit(lab, alice, {**chain(data), "name": name}) for name in ("one", "two", "one")]
    await lab.hub.post(f"/api/pipelines/{made[1]['id']}/cancel", headers=alice)

    async def ids(**params: Any) -> list[str]:
        r = await lab.hub.get("/api/pipelines", params=params, headers=alice)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()]

    assert await ids() == [m["id"] for m in made]
    assert await ids(name="one") == [made[0]["id"], made[2]["id"]]
    assert await ids(status="cancelled") == [made[1]["id"]]
    assert await ids(status="pending", limit=1, offset=1) == [made[2]["id"]]
    r = await lab.hub.get("/api/pipelines", params={"status": "lost"}, headers=alice)
    assert r.status_code == 422


async def lab_ops(lab: Lab, operation: str) -> list[str]:
    async with lab.db.session() as session:
        return list(await session.scalars(select(OperationModel.job_id).where(
            OperationModel.operation == operation, OperationModel.actor.in_(lab.names.values()))))


async def stored(lab: Lab, pid: str) -> tuple[str, bool]:
    """The pipeline's row as stored (no read through the API, which would settle it): its status, and whether
    it has a ``finished_at``."""
    async with lab.db.session() as session:
        row = await session.get(PipelineModel, pid, populate_existing=True)
        assert row is not None
        return row.status, row.finished_at is not None


async def live_attempt(lab: Lab, pipeline: dict[str, Any], step: str) -> str:
    [job] = [j for j in pipeline["steps"] if j["step"] == step]
    async with lab.db.session() as session:
        attempt = await session.scalar(select(JobAttemptModel.id).where(
            JobAttemptModel.job_id == job["id"], JobAttemptModel.status.in_(("starting", "running"))))
        assert attempt is not None
        return attempt


async def test_the_stored_status_follows_when_the_watcher_settles_the_last_step(lab: Lab) -> None:
    alice = await lab.user("alice")
    assert lab.app.watcher is not None
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(p, "to-jsonl", "succeeded")
    await lab.set_step(p, "features", "succeeded")
    await lab.set_step(p, "enhance", "running")
    assert await lab.app.watcher.settle(await live_attempt(lab, p, "enhance"), Collected("succeeded", 0, None))
    assert await stored(lab, p["id"]) == ("succeeded", True)

    failing = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(failing, "to-jsonl", "running")
    assert await lab.app.watcher.settle(await live_attempt(lab, failing, "to-jsonl"),
                                        Collected("failed", 1, "exited with code 1"))
    # The steps after it can never start: cancelled with it, and the pipeline failed, all without a read.
    assert await stored(lab, failing["id"]) == ("failed", True)
    async with lab.db.session() as session:
        steps = dict((await session.execute(select(JobModel.step, JobModel.status).where(
            JobModel.pipeline_id == failing["id"]))).all())
    assert steps == {"to-jsonl": "failed", "features": "cancelled", "enhance": "cancelled"}


async def test_the_stored_status_follows_a_cancelled_step_and_the_queues_cascade(lab: Lab) -> None:
    alice = await lab.user("alice")
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    r = await lab.hub.post(f"/api/jobs/{p['steps'][0]['id']}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    assert await stored(lab, p["id"]) == ("cancelled", True)

    # A step ended failed without the watcher (as the queue finds it): the queue's pass cancels the step after
    # it, and settles the pipeline.
    q = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(q, "to-jsonl", "succeeded")
    await lab.set_step(q, "features", "failed")
    assert lab.app.dispatcher is not None
    await lab.app.dispatcher.dispatch_once()
    # The hub's own queue loop may have taken the pass: wait for its settling to commit.
    for _ in range(200):
        if await stored(lab, q["id"]) == ("failed", True):
            break
        await asyncio.sleep(0.05)
    assert await stored(lab, q["id"]) == ("failed", True)


async def test_retry_counts_against_the_job_quota_and_a_refusal_changes_nothing(lab: Lab,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    alice = await lab.user("alice")
    p = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    await lab.set_step(p, "to-jsonl", "failed")
    failed = await read(lab, alice, p["id"])
    assert failed["status"] == "failed"
    assert lab.app.jobs is not None
    # Three steps would run again; alice has nothing pending or running now.
    monkeypatch.setattr(lab.app.jobs.settings, "max_jobs_per_user", 2)
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 429 and r.json()["error"]["code"] == "JOB_QUOTA_EXCEEDED", r.text
    assert r.json()["error"]["details"] == {"jobs": 0, "limit": 2}
    assert await read(lab, alice, p["id"]) == failed
    assert await lab_ops(lab, "job_retry") == []
    monkeypatch.setattr(lab.app.jobs.settings, "max_jobs_per_user", 3)
    r = await lab.hub.post(f"/api/pipelines/{p['id']}/retry", headers=alice)
    assert r.status_code == 200, r.text
    assert set(statuses(r.json()).values()) == {"pending"}


async def test_owner_narrows_an_admins_list_to_one_users_pipelines(lab: Lab) -> None:
    alice = await lab.user("alice")
    admin = await lab.user("root", admin=True)
    theirs = await submit(lab, alice, chain(await lab.upload("alice", "in.tsv")))
    mine = await submit(lab, admin, {"name": "own", "steps": [{"name": "only", "image": "img:1"}]})

    async def ids(who: dict[str, str], owner: str) -> list[str]:
        r = await lab.hub.get("/api/pipelines", params={"owner": owner}, headers=who)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()]

    assert await ids(admin, lab.names["root"]) == [mine["id"]]
    assert await ids(admin, lab.names["alice"]) == [theirs["id"]]
    assert await ids(admin, "nobody-" + lab.run) == []
    # A user names only their own: another's name finds nothing.
    assert await ids(alice, lab.names["root"]) == []
    assert await ids(alice, lab.names["alice"]) == [theirs["id"]]
