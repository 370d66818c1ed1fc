"""The jobs' queue, watcher and fence on real PostgreSQL, with controllers faked at the HTTP boundary (what the
real controller answers is tested in tests/test_jobs.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.job_schemas import JobSpec
from hub.metrics import HubMetrics
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel, OperationModel, UserModel, utcnow
from hub.scheduler.reconcile import AttemptState, fence
from hub.scheduler.snapshot import PlacementCache
from hub.services.heartbeats import HeartbeatIngest
from hub.services.jobs.artifacts import LocalArtifactStore
from hub.services.jobs.core import JobService, stop_attempts
from hub.services.jobs.queue import MAX_UNCOUNTED_STARTS, Dispatcher
from hub.services.jobs.watch import MAX_COLLECT_FAILURES, Watcher
from hub.services.operations import OperationLog
from hub.services.users import create_user
from mmanager.wire import HeartbeatContainer
from tests.support.poll import eventually

KEY = "test-key-" + "x" * 32


class FakeControllers:
    """Controllers as the hub's client sees them: runs started, their state, outputs and logs."""

    def __init__(self) -> None:
        self.started: list[tuple[str, dict[str, Any]]] = []
        self.refuse: set[str] = set()
        self.runs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, bytes]] = {}
        self.deleted: list[str] = []
        self.cancelled: list[str] = []
        self.wrong_sha: set[str] = set()
        # How a refusing controller refuses a start.
        self.refusal = (409, "CAPACITY_EXCEEDED")
        # An answer to every output file's GET instead of its bytes (a status), and the GETs made.
        self.output_status: int | None = None
        self.output_gets: list[str] = []
        # Set: a start waits for it (a slow image pull).
        self.gate: asyncio.Event | None = None

    def end(self, attempt_id: str, exit_code: int, outputs: dict[str, bytes] | None = None) -> None:
        self.runs[attempt_id].update(state="exited", exit_code=exit_code, collectable=True)
        self.outputs[attempt_id] = outputs or {}

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host, path, method = request.url.host, request.url.path, request.method
        if method == "POST" and path == "/jobs/":
            if self.gate is not None:
                await self.gate.wait()
            if host in self.refuse:
                status, code = self.refusal
                return httpx.Response(status, json={"error": {"code": code, "message": f"refused: {code}"}})
            body = json.loads(request.content)
            self.started.append((host, body))
            run = {"attempt_id": body["attempt_id"], "job_id": body["job_id"], "number": body["number"],
                   "state": "running"}
            self.runs[body["attempt_id"]] = run
            return httpx.Response(201, json=run)
        if method == "GET" and path == "/jobs/":
            return httpx.Response(200, json={"version": 1, "runs": list(self.runs.values())})
        parts = path.split("/")
        attempt = parts[2]
        if method == "DELETE":
            self.deleted.append(attempt)
            self.runs.pop(attempt, None)
            return httpx.Response(200, json={})
        if path.endswith("/cancel"):
            self.cancelled.append(attempt)
            self.runs[attempt].update(state="cancelled", collectable=True)
            self.outputs.setdefault(attempt, {})
            return httpx.Response(200, json=self.runs[attempt])
        if path.endswith("/outputs"):
            files = [{"path": p, "size": len(b), "sha256": hashlib.sha256(b + (b"x" if attempt in self.wrong_sha
                                                                               else b"")).hexdigest()}
                     for p, b in self.outputs[attempt].items()]
            return httpx.Response(200, json={"files": files})
        if "/outputs/" in path:
            self.output_gets.append("/".join(parts[4:]))
            if self.output_status is not None:
                return httpx.Response(self.output_status, json={"error": {"code": "X", "message": "no"}})
            return httpx.Response(200, content=self.outputs[attempt]["/".join(parts[4:])])
        if path.endswith("/logs"):
            return httpx.Response(200, content=f"log of {attempt}\n".encode())
        return httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": path}})


class Parts:
    def __init__(self, db: Database, tmp: Path, fake: FakeControllers) -> None:
        self.db = db
        self.fake = fake
        self.settings = HubSettings(database_url=db.url, api_key=KEY, artifact_store=tmp / "artifacts",
                                    max_jobs_per_user=5)
        self.client = ControllerClient(self.settings, transport=httpx.MockTransport(fake.handler))
        self.ops = OperationLog(db, HubMetrics())
        self.store = LocalArtifactStore(tmp / "artifacts")
        self.jobs = JobService(db, self.settings, self.ops, self.store)
        self.dispatcher = self.new_dispatcher(db)
        self.watcher = Watcher(db, self.client, self.ops, self.store, wait=0.1)

    async def dispatch(self) -> int:
        """One pass of the queue and the starts it made."""
        n = await self.dispatcher.dispatch_once()
        await self.dispatcher.drain()
        return n

    def new_dispatcher(self, db: Database) -> Dispatcher:
        return Dispatcher(db, self.client, self.ops, PlacementCache(db, max_age=0.0, refresh_after=0.0, avoid_for=0.0))

    async def controller(self, cid: str, max_containers: int = 100, server_type: str = "cpu") -> None:
        async with self.db.session() as session:
            session.add(ControllerModel(id=cid, url=f"http://{cid}:8001", server_type=server_type, status="healthy",
                                        max_containers=max_containers, last_heartbeat_at=utcnow()))

    async def user(self, name: str) -> UserModel:
        async with self.db.session() as session:
            user, _ = await create_user(session, name)
        return user

    async def job(self, user: UserModel, name: str = "j", **spec: Any) -> str:
        return (await self.jobs.submit(user, JobSpec(name=name, image="busybox", command=["true"], **spec))).id

    async def row(self, job_id: str) -> JobModel:
        async with self.db.session() as session:
            job = await session.get(JobModel, job_id)
            assert job is not None
            return job

    async def attempts(self, job_id: str) -> list[JobAttemptModel]:
        async with self.db.session() as session:
            return list(await session.scalars(select(JobAttemptModel).where(JobAttemptModel.job_id == job_id)
                                              .order_by(JobAttemptModel.number)))

    async def ops_of(self, job_id: str) -> list[str]:
        async with self.db.session() as session:
            return list(await session.scalars(select(OperationModel.operation).where(OperationModel.job_id == job_id)
                                              .order_by(OperationModel.created_at)))

    async def settle_all(self, cid: str) -> None:
        listing = await self.client.job_runs(cid, f"http://{cid}:8001")
        assert await self.watcher.observe(cid, f"http://{cid}:8001", listing.runs)


@pytest.fixture
async def parts(db: Database, tmp_path: Path) -> Any:
    fake = FakeControllers()
    p = Parts(db, tmp_path, fake)
    yield p
    await p.client.aclose()


async def test_queue_takes_priority_then_fair_share_then_age(parts: Parts) -> None:
    await parts.controller("c1", max_containers=3)
    alice, bob, carol = await parts.user("alice"), await parts.user("bob"), await parts.user("carol")
    a1 = await parts.job(alice, "a1")
    a2 = await parts.job(alice, "a2")
    b1 = await parts.job(bob, "b1")
    c1 = await parts.job(carol, "c1", priority=5)
    assert await parts.dispatch() == 3
    started = {body["job_id"] for _, body in parts.fake.started}
    # carol's first (priority), then alice's oldest, then bob's (alice runs one already) before alice's second.
    assert started == {c1, a1, b1}
    waiting = await parts.row(a2)
    assert waiting.status == "pending"
    assert waiting.wait_reasons and waiting.wait_reasons[0]["code"] == "MAX_CONTAINERS"
    assert "waiting for room" in (waiting.status_message or "")
    assert await parts.ops_of(a1) == ["job_submit", "job_start"]


async def test_two_dispatchers_never_start_one_job_twice(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    parts.settings.max_jobs_per_user = 100
    ids = [await parts.job(user, f"j{i}") for i in range(30)]
    other_db = Database(db.url)
    try:
        other = parts.new_dispatcher(other_db)
        for _ in range(3):
            await asyncio.gather(parts.dispatcher.dispatch_once(), other.dispatch_once())
            await asyncio.gather(parts.dispatcher.drain(), other.drain())
    finally:
        await other_db.dispose()
    started = [body["job_id"] for _, body in parts.fake.started]
    assert sorted(started) == sorted(ids)
    async with db.session() as session:
        counts = dict((await session.execute(select(JobAttemptModel.job_id, func.count())
                                             .group_by(JobAttemptModel.job_id))).all())
    assert set(counts.values()) == {1}


async def test_a_job_that_could_never_run_is_refused_and_nothing_is_written(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    with pytest.raises(Conflict) as refused:
        await parts.job(user, resources={"gpu_count": 1})
    assert refused.value.code == "NEVER_FITS"
    assert refused.value.details["rejections"][0]["controller_id"] == "c1"
    # A full controller is not a refusal: the job waits.
    async with db.session() as session:
        await session.execute(update(ControllerModel).values(containers_running=100, status="unhealthy"))
    await parts.job(user)
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(JobModel)) == 1


async def test_bad_inputs_are_refused_and_change_nothing(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    alice, bob = await parts.user("alice"), await parts.user("bob")
    async with db.session() as session:
        theirs = ArtifactModel(owner_id=bob.id, name="x.txt", digest="sha256:" + "0" * 64, size=1)
        session.add(theirs)
    bobs_job = await parts.job(bob)
    for inputs, code in (([theirs.id], "ARTIFACT_NOT_FOUND"), (["f" * 32], "ARTIFACT_NOT_FOUND"),
                         ([{"job": bobs_job, "path": "out.txt"}], "JOB_NOT_FOUND")):
        with pytest.raises(NotFound) as refused:
            await parts.job(alice, inputs=inputs)
        assert refused.value.code == code
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(JobModel)
                                    .where(JobModel.owner_id == alice.id)) == 0
    # The quota: 429 with a code, nothing written.
    for _ in range(5):
        await parts.job(alice)
    with pytest.raises(Exception) as over:
        await parts.job(alice)
    assert getattr(over.value, "code", None) == "JOB_QUOTA_EXCEEDED"


async def test_cancel_a_pending_job_then_again(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    async with db.session() as session:
        await parts.jobs.cancel(session, user, job_id)
    assert (await parts.row(job_id)).status == "cancelled"
    with pytest.raises(Conflict) as again:
        async with db.session() as session:
            await parts.jobs.cancel(session, user, job_id)
    assert again.value.code == "JOB_FINISHED"
    assert await parts.dispatch() == 0
    assert await parts.ops_of(job_id) == ["job_submit", "job_cancelled"]


async def test_a_failed_attempt_is_retried_after_a_backoff_then_the_job_fails(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user, retries=1)
    await parts.dispatch()
    first = (await parts.attempts(job_id))[0]
    parts.fake.end(first.id, 3)
    await parts.settle_all("c1")
    job = await parts.row(job_id)
    assert (job.status, job.retries) == ("pending", 0)
    assert job.not_before is not None and job.not_before > utcnow() + timedelta(seconds=1)
    assert first.id in parts.fake.deleted
    # Not before its backoff.
    assert await parts.dispatch() == 0
    async with db.session() as session:
        await session.execute(update(JobModel).values(not_before=utcnow()))
    assert await parts.dispatch() == 1
    second = (await parts.attempts(job_id))[1]
    parts.fake.end(second.id, 3)
    await parts.settle_all("c1")
    job = await parts.row(job_id)
    assert (job.status, job.exit_code, job.attempts) == ("failed", 3, 2)
    assert await parts.ops_of(job_id) == ["job_submit", "job_start", "job_retry", "job_start", "job_failed"]


async def test_outputs_are_collected_checked_and_feed_the_next_job(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    first = await parts.job(user, "first")
    second = await parts.job(user, "second", inputs=[{"job": first, "path": "out/a.txt", "as": "a.txt"}])
    assert await parts.dispatch() == 1
    attempt = (await parts.attempts(first))[0]
    parts.fake.end(attempt.id, 0, {"out/a.txt": b"hello"})
    await parts.settle_all("c1")
    assert (await parts.row(first)).status == "succeeded"
    async with db.session() as session:
        rows = list(await session.scalars(select(ArtifactModel).where(ArtifactModel.job_id == first)))
        logged = await session.get(JobAttemptModel, attempt.id)
    assert [(r.name, r.digest) for r in rows] == [("out/a.txt", "sha256:" + hashlib.sha256(b"hello").hexdigest())]
    assert logged is not None and logged.log_digest and await parts.store.exists(logged.log_digest)
    assert await parts.dispatch() == 1
    run = [body for _, body in parts.fake.started if body["job_id"] == second][0]
    assert run["inputs"] == [{"digest": rows[0].digest, "path": "a.txt"}]


async def test_a_job_is_placed_where_its_inputs_were_made_when_that_controller_fits(parts: Parts) -> None:
    await parts.controller("c1")
    await parts.controller("c2")
    user = await parts.user("alice")

    async def started_on(job_id: str) -> str:
        parts.dispatcher.placement.stale()  # placed on a fresh snapshot, with the ended attempts gone from it
        assert await parts.dispatch() == 1
        return [host for host, body in parts.fake.started if body["job_id"] == job_id][0]

    assert await started_on(await parts.job(user, "blocker")) == "c1"
    first = await parts.job(user, "first")
    assert await started_on(first) == "c2"  # c1 is busier
    parts.fake.end((await parts.attempts(first))[0].id, 0, {"out.txt": b"made on c2"})
    await parts.settle_all("c2")
    assert await started_on(await parts.job(user, "busy")) == "c2"
    # One job each: load alone would pick c1 (the first by id); the input was made on c2, which keeps it.
    second = await parts.job(user, "second", inputs=[{"job": first, "path": "out.txt"}])
    assert await started_on(second) == "c2"


async def test_the_last_progress_a_job_wrote_is_kept_when_it_ends(parts: Parts) -> None:
    # A step that ends between two of the watcher's looks still shows its final count.
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatcher.dispatch_once()
    attempt = (await parts.attempts(job_id))[0]
    parts.fake.end(attempt.id, 0)
    final = {"done": 496, "total": 496, "unit": "records", "rate": 1200.5}
    parts.fake.runs[attempt.id]["progress"] = final
    await parts.settle_all("c1")
    job = await parts.row(job_id)
    [settled] = await parts.attempts(job_id)
    assert job.status == "succeeded" and job.progress is not None and settled.progress == job.progress
    assert {k: job.progress[k] for k in final} == final


async def test_a_checksum_mismatch_fails_the_attempt(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    attempt = (await parts.attempts(job_id))[0]
    parts.fake.wrong_sha.add(attempt.id)
    parts.fake.end(attempt.id, 0, {"x": b"1"})
    await parts.settle_all("c1")
    job = await parts.row(job_id)
    assert job.status == "failed" and "sha256" in (job.status_message or "")


async def test_a_needed_job_that_failed_cancels_its_dependant(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    first = await parts.job(user, "first")
    second = await parts.job(user, "second", inputs=[{"job": first, "path": "o"}])
    await parts.dispatch()
    parts.fake.end((await parts.attempts(first))[0].id, 1)
    await parts.settle_all("c1")
    await parts.dispatch()
    job = await parts.row(second)
    assert job.status == "cancelled" and first in (job.status_message or "")


async def test_refused_and_lost_attempts_run_again_not_counted_as_retries(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    await parts.controller("c2")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    parts.fake.refuse.add("c1")
    parts.fake.refuse.add("c2")
    await parts.dispatch()
    job = await parts.row(job_id)
    assert (job.status, job.retries) == ("pending", 0)
    assert [a.status for a in await parts.attempts(job_id)] == ["failed"]
    parts.fake.refuse.clear()
    await parts.dispatch()
    running = (await parts.attempts(job_id))[-1]
    async with db.session() as session:
        await session.execute(update(ControllerModel).where(ControllerModel.id == running.controller_id)
                              .values(status="unhealthy"))
    parts.dispatcher.placement.stale()
    await parts.watcher.tick()
    await parts.watcher.stop()
    job = await parts.row(job_id)
    assert job.status == "pending"
    assert (await parts.attempts(job_id))[-1].status == "lost"
    assert "job_lost" in await parts.ops_of(job_id)
    await parts.dispatch()
    last = (await parts.attempts(job_id))[-1]
    assert last.status == "starting" and last.controller_id != running.controller_id


def test_the_fence_stops_job_containers_whose_attempt_is_not_current() -> None:
    def container(attempt: str, age: float = 100.0) -> HeartbeatContainer:
        return HeartbeatContainer(container_id=f"c-{attempt}", name=attempt, state="running", epoch=1,
                                  age_seconds=age, job_id="j", attempt_id=attempt)

    attempts = {"live": AttemptState(2, "running", 2), "old": AttemptState(1, "running", 2),
                "ended": AttemptState(2, "succeeded", 2), "lost": AttemptState(2, "lost", 2)}
    result = fence([], [container(a) for a in ("live", "old", "ended", "lost", "unknown")] +
                   [container("young", age=1.0)], orphan_grace=10, attempts=attempts)
    assert sorted((o.attempt_id, o.reason) for o in result.stop) == [
        ("ended", "stale_attempt"), ("lost", "stale_attempt"), ("old", "stale_attempt"),
        ("unknown", "stale_attempt")]
    # Without the attempts read (a beat judged without it), job containers are left alone.
    assert fence([], [container("old")], orphan_grace=10).stop == []


async def test_jobs_waiting_for_others_do_not_hide_a_runnable_one(parts: Parts) -> None:
    await parts.controller("c1", max_containers=1)
    user = await parts.user("alice")
    parts.settings.max_jobs_per_user = 200
    blocker = await parts.job(user, "blocker")
    await parts.dispatch()
    for i in range(70):
        await parts.job(user, f"later{i}", inputs=[{"job": blocker, "path": "o"}])
    async with parts.db.session() as session:
        await session.execute(update(ControllerModel).values(max_containers=2))
    parts.dispatcher.placement.stale()
    runnable = await parts.job(user, "runnable")
    assert await parts.dispatch() == 1
    assert parts.fake.started[-1][1]["job_id"] == runnable


async def test_a_beat_with_job_containers_reads_their_attempts_and_one_without_reads_nothing(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    attempt = (await parts.attempts(job_id))[0]
    ingest = HeartbeatIngest(parts.db, parts.settings, HubMetrics())
    service = HeartbeatContainer(container_id="s", name="s", state="running", service_id="x", epoch=1)
    assert await ingest.attempts_of([service]) is None
    job = HeartbeatContainer(container_id="j", name="j", state="running", epoch=1, job_id=job_id,
                             attempt_id=attempt.id)
    assert await ingest.attempts_of([service, job]) == {attempt.id: AttemptState(1, "starting", 1)}


async def test_stop_attempts_tells_the_controller_of_a_cancelled_running_job(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    async with db.session() as session:
        _, live = await parts.jobs.cancel(session, user, job_id)
    assert live is not None
    await stop_attempts(db, parts.client, [None, live], f"job {job_id}")
    assert parts.fake.cancelled == [live.id]


async def test_a_cancelled_running_job_keeps_its_state_when_its_attempt_ends(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user, retries=3)
    await parts.dispatch()
    async with db.session() as session:
        job, live = await parts.jobs.cancel(session, user, job_id)
    assert job.status == "cancelled" and live is not None
    # The controller was not told (out of reach): the watcher tells it, then collects the end.
    await parts.settle_all("c1")
    assert parts.fake.cancelled == [live.id]
    await parts.settle_all("c1")
    [attempt] = await parts.attempts(job_id)
    assert attempt.status == "cancelled" and attempt.log_digest is not None
    assert (await parts.row(job_id)).status == "cancelled"
    assert await parts.ops_of(job_id) == ["job_submit", "job_start", "job_cancelled"]


async def test_an_attempt_past_its_timeout_with_no_end_reported_is_settled_timed_out(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user, timeout=1)
    await parts.dispatch()
    parts.watcher.timeout_grace = 0
    assert await parts.watcher.backstop() == 0
    # Still pulling its image (not started): its timeout has not begun.
    async with db.session() as session:
        await session.execute(update(JobAttemptModel).values(created_at=utcnow() - timedelta(seconds=5)))
    assert await parts.watcher.backstop() == 0
    async with db.session() as session:
        await session.execute(update(JobAttemptModel).values(started_at=utcnow() - timedelta(seconds=5)))
    assert await parts.watcher.backstop() == 1
    job = await parts.row(job_id)
    assert job.status == "timed_out" and (await parts.attempts(job_id))[0].status == "timed_out"
    assert parts.fake.cancelled
    # One that never started at all is given the time its start may take, then timed out too.
    other = await parts.job(user, timeout=1)
    await parts.dispatch()
    async with db.session() as session:
        await session.execute(update(JobAttemptModel).where(JobAttemptModel.job_id == other)
                              .values(created_at=utcnow() - timedelta(seconds=parts.watcher.missing_grace - 10)))
    assert await parts.watcher.backstop() == 0
    async with db.session() as session:
        await session.execute(update(JobAttemptModel).where(JobAttemptModel.job_id == other)
                              .values(created_at=utcnow() - timedelta(seconds=parts.watcher.missing_grace + 5)))
    assert await parts.watcher.backstop() == 1


async def test_an_attempt_its_controller_does_not_hold_is_placed_again(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    [attempt] = await parts.attempts(job_id)
    parts.fake.runs.clear()  # the controller lost it (or the request never arrived)
    await parts.settle_all("c1")
    assert (await parts.row(job_id)).status == "running"  # a start may still be on its way
    async with db.session() as session:
        await session.execute(update(JobAttemptModel).values(created_at=utcnow() - timedelta(hours=1)))
    await parts.settle_all("c1")
    job = await parts.row(job_id)
    assert (job.status, job.retries) == ("pending", 0)
    assert (await parts.attempts(job_id))[0].status == "failed"


async def test_a_run_that_ended_before_any_listing_saw_it_keeps_its_start_time(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job = await parts.job(user, "short")
    assert await parts.dispatch() == 1
    attempt = (await parts.attempts(job))[0]
    began = utcnow() - timedelta(seconds=1)
    parts.fake.runs[attempt.id]["started_at"] = began.isoformat()
    parts.fake.end(attempt.id, 0)
    await parts.settle_all("c1")
    [settled] = await parts.attempts(job)
    assert (settled.status, settled.started_at) == ("succeeded", began)


async def test_a_snapshot_taken_during_a_pass_does_not_overfill_a_controller(parts: Parts,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    await parts.controller("c1", max_containers=2)
    await parts.controller("c2", max_containers=2)
    user = await parts.user("alice")
    for i in range(5):
        await parts.job(user, f"j{i}")
    inputs = Dispatcher._inputs

    async def refreshed(self: Dispatcher, session: Any, job: JobModel) -> Any:
        # A background snapshot replacing the cache's index while the pass awaits.
        await self.placement.refresh(time.monotonic())
        return await inputs(self, session, job)

    monkeypatch.setattr(Dispatcher, "_inputs", refreshed)
    assert await parts.dispatch() == 4
    hosts = [host for host, _ in parts.fake.started]
    assert sorted(hosts) == ["c1", "c1", "c2", "c2"]


async def test_a_controller_refusing_the_job_itself_counts_against_its_retries(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    parts.fake.refuse.add("c1")
    parts.fake.refusal = (422, "IMAGE_PULL_FAILED")
    job_id = await parts.job(user, retries=1)
    assert await parts.dispatch() == 1
    job = await parts.row(job_id)
    assert (job.status, job.retries) == ("pending", 0) and job.not_before is not None
    async with parts.db.session() as session:
        await session.execute(update(JobModel).values(not_before=utcnow()))
    parts.dispatcher.placement.stale()  # the refusing controller is avoided only while another could do
    assert await parts.dispatch() == 1
    job = await parts.row(job_id)
    assert job.status == "failed" and "IMAGE_PULL_FAILED" in (job.status_message or "")
    assert [a.status for a in await parts.attempts(job_id)] == ["failed", "failed"]
    assert await parts.ops_of(job_id) == ["job_submit", "job_start", "job_retry", "job_start", "job_failed"]


async def test_passing_refusals_are_not_counted_but_only_so_many_times(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    parts.fake.refuse.add("c1")
    job_id = await parts.job(user)
    for _ in range(MAX_UNCOUNTED_STARTS):
        assert await parts.dispatch() == 1
        assert (await parts.row(job_id)).status == "pending"
        parts.dispatcher.placement.stale()
    assert await parts.dispatch() == 1
    job = await parts.row(job_id)
    assert job.status == "failed" and "CAPACITY_EXCEEDED" in (job.status_message or "")
    assert len(await parts.attempts(job_id)) == MAX_UNCOUNTED_STARTS + 1


async def test_inputs_mounted_one_inside_another_are_refused(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    async with db.session() as session:
        art = ArtifactModel(owner_id=user.id, name="a", digest="sha256:" + "0" * 64, size=1)
        session.add(art)
    for inputs in ([{"artifact": art.id, "path": "a"}, {"artifact": art.id, "path": "a/b"}],
                   [art.id, {"artifact": art.id, "path": "a/x"}]):
        with pytest.raises(InvalidRequest) as refused:
            await parts.job(user, inputs=inputs)
        assert refused.value.code == "INPUT_PATH_CONFLICT"
    await parts.job(user, inputs=[{"artifact": art.id, "path": "a"}, {"artifact": art.id, "path": "ab/c"}])


async def test_outputs_with_any_name_are_collected(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    [attempt] = await parts.attempts(job_id)
    names = ["what?.txt", "x#y", "a%41.txt", "dir/sp ace.txt"]
    parts.fake.end(attempt.id, 0, {n: n.encode() for n in names})
    await parts.settle_all("c1")
    assert (await parts.row(job_id)).status == "succeeded"
    async with db.session() as session:
        rows = list(await session.scalars(select(ArtifactModel).where(ArtifactModel.job_id == job_id)))
    assert sorted((r.name, r.size) for r in rows) == sorted((n, len(n)) for n in names)


async def test_outputs_too_large_fail_the_attempt_at_once_without_a_retry(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    parts.watcher.artifact_max_bytes, parts.watcher.artifacts_per_user_bytes = 10, 15
    for outputs in ({"big": b"x" * 11}, {"a": b"x" * 8, "b": b"x" * 8}):
        job_id = await parts.job(user, retries=2)
        await parts.dispatch()
        [attempt] = await parts.attempts(job_id)
        parts.fake.end(attempt.id, 0, outputs)
        await parts.settle_all("c1")
        job = await parts.row(job_id)
        assert job.status == "failed" and "OUTPUTS_TOO_LARGE" in (job.status_message or ""), job.status_message
        [attempt] = await parts.attempts(job_id)
        assert attempt.log_digest is not None and attempt.id in parts.fake.deleted
    assert parts.fake.output_gets == []
    # Within both limits: collected.
    job_id = await parts.job(user)
    await parts.dispatch()
    parts.fake.end((await parts.attempts(job_id))[0].id, 0, {"a": b"x" * 8})
    await parts.settle_all("c1")
    assert (await parts.row(job_id)).status == "succeeded"


async def test_a_collection_that_keeps_failing_fails_the_attempt(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    url = "http://c1:8001"
    # The controller fails (5xx) for each listed file: tried again, then the attempt fails and the job retries.
    parts.fake.output_status = 500
    job_id = await parts.job(user, retries=1)
    await parts.dispatch()
    [attempt] = await parts.attempts(job_id)
    parts.fake.end(attempt.id, 0, {"o": b"1"})
    for _ in range(MAX_COLLECT_FAILURES - 1):
        assert not await parts.watcher.observe("c1", url, (await parts.client.job_runs("c1", url)).runs)
        assert (await parts.attempts(job_id))[0].status == "starting"
    assert not await parts.watcher.observe("c1", url, (await parts.client.job_runs("c1", url)).runs)
    [attempt] = await parts.attempts(job_id)
    assert attempt.status == "failed" and "could not be collected" in (attempt.error or "")
    job = await parts.row(job_id)
    assert (job.status, job.retries) == ("pending", 0)
    await parts.settle_all("c1")  # and deleted on its controller
    assert attempt.id in parts.fake.deleted
    # A listed file the controller refuses (4xx): failed at once.
    parts.fake.output_status = 404
    async with db.session() as session:
        await session.execute(update(JobModel).values(not_before=utcnow()))
    await parts.dispatch()
    second = (await parts.attempts(job_id))[1]
    parts.fake.end(second.id, 0, {"o": b"1"})
    assert not await parts.watcher.observe("c1", url, (await parts.client.job_runs("c1", url)).runs)
    assert (await parts.attempts(job_id))[1].status == "failed"
    assert (await parts.row(job_id)).status == "failed"


async def test_a_pass_does_not_wait_for_a_slow_start_and_stop_cancels_it(parts: Parts) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    parts.fake.gate = asyncio.Event()
    first = await parts.job(user, "first")
    assert await asyncio.wait_for(parts.dispatcher.dispatch_once(), 10) == 1
    # The start still waits on its controller; the next pass starts the next job meanwhile.
    second = await parts.job(user, "second")
    assert await asyncio.wait_for(parts.dispatcher.dispatch_once(), 10) == 1
    assert parts.fake.started == []
    assert {(await parts.row(j)).status for j in (first, second)} == {"running"}
    await parts.dispatcher.stop()
    assert parts.fake.started == []
    parts.fake.gate.set()


async def test_rows_are_locked_job_first_then_attempt(parts: Parts, db: Database) -> None:
    await parts.controller("c1")
    user = await parts.user("alice")
    job_id = await parts.job(user)
    await parts.dispatch()
    [attempt] = await parts.attempts(job_id)
    other = Database(db.url)

    async def blocked() -> bool:
        async with other.session() as s:
            return bool(await s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")))

    try:
        for step in (lambda: parts.dispatcher.unstart(job_id, attempt.id, 1, "c1", "refused"),
                     lambda: parts.watcher.give_up(["c1"])):
            async with other.session() as holder:
                # Another writer holds the job's row (as settle or cancel does)...
                await holder.execute(select(JobModel.id).where(JobModel.id == job_id).with_for_update())
                task = asyncio.create_task(step())
                await eventually(blocked, 10, "the step waiting on the job's row")
                # ...and takes the attempt's next: the step must not hold it while it waits (a deadlock).
                await holder.execute(select(JobAttemptModel).where(JobAttemptModel.id == attempt.id)
                                     .with_for_update(nowait=True))
            await task
            async with db.session() as session:
                await session.execute(update(JobAttemptModel).values(status="running"))
                await session.execute(update(JobModel).values(status="running"))
    finally:
        await other.dispose()
