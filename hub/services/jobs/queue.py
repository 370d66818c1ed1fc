"""The queue: which pending jobs start now, where, and the call that starts them (every hub replica).

One pass (``Dispatcher.dispatch_once``) claims the pending jobs whose ``not_before`` passed with
``SELECT ... FOR UPDATE SKIP LOCKED`` (SQLite, one hub: a plain select), cancels those that need a job that
ended without success, leaves those whose needs have not succeeded yet, and takes the rest in order: priority
(higher first), then the owner's running jobs (fewer first: fair share, recounted as the pass starts jobs), then
age. Each is placed (``PlacementCache``); in the same transaction its attempt is written ``starting`` and the job
``running`` (epoch and attempts + 1). Only after the commit are the controllers asked (``POST /jobs/``).

Invariants: a job is claimed by one replica at a time (row locks), so no two replicas start one job twice; an
attempt row exists before its controller is asked. A pass does not wait for the controllers: each start runs as a
task of its own (``stop()`` cancels and awaits them). A controller's silence or a passing refusal (busy, stale,
not synced) fails that attempt and puts the job back to pending at once, not counted as a retry, at most
``MAX_UNCOUNTED_STARTS`` times per job; any other refusal (the image, the inputs, the spec) is a failed attempt
counted against the job's retries. Rows are locked job first, then attempt. A job that does not fit stays
pending, its ``status_message`` and ``wait_reasons`` written only when they change.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import lazyload

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import ControllerRejected, HubError
from hub.job_schemas import ArtifactInput, JobOutputInput
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel, utcnow
from hub.scheduler.placement import Placement
from hub.scheduler.snapshot import Held, PlacementCache
from hub.services.jobs import pipelines
from hub.services.jobs.core import add_op, backoff, job_request, lock_job, output_digest, parse_spec
from hub.services.operations import OperationLog
from hub.services.users import SYSTEM_ACTOR
from mmanager.wire import JobInput, JobRun

log = logging.getLogger(__name__)

# Jobs claimed in one page, and pages in one pass at most.
BATCH = 64
MAX_PAGES = 8
# A controller's refusals that say nothing about the job (it is busy, behind, or saw a newer attempt): the job
# is placed again at once, not counted as a retry. Any other refusal is the job's (its image, inputs, spec).
PASSING_REFUSALS = frozenset({"STALE_EPOCH", "CAPACITY_EXCEEDED", "CONTROLLER_NOT_SYNCED", "MODEL_CACHE_FULL"})
# Starts that failed without counting against the job's retries, past which each failure counts: a controller
# that fails every start (a bug, a 5xx) must not keep a job cycling for ever.
MAX_UNCOUNTED_STARTS = 5
# How an uncounted failed start's attempt error begins (what the cap counts).
NOT_STARTED = "not started: "


@dataclass
class _Start:
    job_id: str
    attempt_id: str
    controller_id: str
    url: str
    run: JobRun
    held: Held


def _wait_message(decision: Placement) -> tuple[str, list[dict[str, str]]]:
    reasons = [r.as_dict() for r in decision.rejections]
    codes = sorted({r.code for r in decision.rejections})
    return (f"waiting for room: no controller can take it now ({', '.join(codes) or 'no controller'})", reasons)


class Dispatcher:
    def __init__(self, db: Database, client: ControllerClient, ops: OperationLog, placement: PlacementCache,
                 replica_id: str | None = None) -> None:
        self.db = db
        self.client = client
        self.ops = ops
        self.placement = placement
        self.replica_id = replica_id
        # The starts under way (each a controller call that may take as long as an image pull).
        self._starts: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Cancel the starts under way and wait for them (an attempt left ``starting`` is the missing-attempt
        check's: its controller either holds it or it is placed again)."""
        tasks = list(self._starts)
        for task in tasks:
            task.cancel()
        await self.drain()

    async def drain(self) -> None:
        """Wait for the starts under way to end."""
        while self._starts:
            await asyncio.wait(list(self._starts))

    async def dispatch_once(self) -> int:
        """One pass over the queue; how many attempts it started (their controllers are asked by tasks of their
        own: the pass does not wait for them)."""
        starts: list[_Start] = []
        # The pipelines whose steps this pass cancelled, settled once it committed.
        stopped: set[str] = set()
        async with self.db.session() as session:
            now = utcnow()
            query = (select(JobModel).options(lazyload(JobModel.owner))
                     .where(JobModel.status == "pending", or_(JobModel.not_before.is_(None), JobModel.not_before <= now))
                     .order_by(JobModel.priority.desc(), JobModel.created_at, JobModel.id).limit(BATCH))
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True, of=JobModel)
            # Jobs that wait for others (a pipeline's later steps) must not hide runnable ones behind them: more
            # pages are claimed while the ones claimed hold fewer than a batch that could run.
            jobs: list[JobModel] = []
            for page in range(MAX_PAGES):
                claimed = list(await session.scalars(query.offset(page * BATCH)))
                jobs += claimed
                if len(claimed) < BATCH or sum(1 for j in jobs if not j.needs) >= BATCH:
                    break
            if not jobs:
                return 0
            wanted = {n for j in jobs for n in j.needs or ()}
            needed: dict[str, str] = {}
            if wanted:
                needed = dict((await session.execute(select(JobModel.id, JobModel.status)
                                                     .where(JobModel.id.in_(wanted)))).all())
            runnable = []
            for job in jobs:
                bad = [n for n in job.needs or () if needed.get(n, "cancelled") in ("failed", "cancelled", "timed_out")]
                if bad:
                    job.status, job.finished_at = "cancelled", now
                    job.status_message = f"cancelled: job {bad[0]} it needs ended {needed.get(bad[0], 'gone')}"
                    job.wait_reasons = None
                    add_op(self.ops, session, "job_cancelled", SYSTEM_ACTOR, job, needs=bad[0])
                    if job.pipeline_id is not None:
                        stopped.add(job.pipeline_id)
                    continue
                waiting = [n for n in job.needs or () if needed.get(n) != "succeeded"]
                if waiting:
                    message = f"waiting for job {waiting[0]} to succeed"
                    if job.status_message != message:
                        job.status_message, job.wait_reasons = message, None
                    continue
                runnable.append(job)
            owners = {j.owner_id for j in runnable}
            running: dict[int, int] = {}
            if owners:
                running = dict((await session.execute(
                    select(JobModel.owner_id, func.count()).where(JobModel.status == "running",
                                                                  JobModel.owner_id.in_(owners))
                    .group_by(JobModel.owner_id))).all())
            index = await self.placement.index() if runnable else None
            held: list[Held] = []
            try:
                while runnable:
                    # Fair share, recounted as this pass starts jobs.
                    job = min(runnable, key=lambda j: (-j.priority, running.get(j.owner_id, 0), j.created_at, j.id))
                    runnable.remove(job)
                    # The cache's current index, not the one the pass began with: a snapshot taken meanwhile (in
                    # the background, while this pass awaited) replaced it, and holds count only in the new one.
                    index = self.placement.current
                    start = await self._place(session, job, index, now)
                    if start is not None:
                        held.append(start.held)
                        starts.append(start)
                        running[job.owner_id] = running.get(job.owner_id, 0) + 1
                await session.commit()
            except BaseException:
                for h in held:
                    self.placement.release(h)
                raise
        if stopped:
            await pipelines.settle_ids(self.db, self.ops, stopped)
        for start in starts:
            self.placement.committed(start.held)
        for start in starts:
            task = asyncio.create_task(self._run(start), name=f"job-start-{start.attempt_id}")
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)
        return len(starts)

    async def _place(self, session: Any, job: JobModel, index: Any, now: Any) -> _Start | None:
        spec = parse_spec(job)
        request = job_request(spec)
        decision = index.place(request)
        if not decision.placed:
            message, reasons = _wait_message(decision)
            if job.status_message != message or job.wait_reasons != reasons:
                job.status_message, job.wait_reasons = message, reasons
            return None
        inputs = await self._inputs(session, job)
        if isinstance(inputs, str):
            job.status, job.finished_at, job.status_message, job.wait_reasons = "failed", now, inputs, None
            add_op(self.ops, session, "job_failed", SYSTEM_ACTOR, job, error=inputs)
            return None
        near = await _made_most(session, inputs)
        if near is not None and near != decision.controller_id:
            decision = index.place_on(request, near, decision.controller_id) or decision
        url = self.placement.urls.get(decision.controller_id or "")
        if url is None:
            return None
        # The controller's row locked until the attempt commits (as a service's placement locks it): a DELETE
        # of the controller waits for the attempt and sees it, or deletes first and the job waits for another.
        C = ControllerModel
        if await session.scalar(select(C.id).where(C.id == decision.controller_id, C.enabled.is_(True),
                                                   C.draining.is_(False))
                                .with_for_update(read=True, key_share=True)) is None:
            return None
        held = self.placement.hold(decision, request)
        number = job.epoch + 1
        attempt = JobAttemptModel(job_id=job.id, number=number, controller_id=decision.controller_id,
                                  status="starting", memory_bytes=request.memory, cpu_limit=request.cpu,
                                  gpu_devices=list(decision.gpu_devices), hub_replica=self.replica_id,
                                  created_at=now, log_size=0)
        session.add(attempt)
        await session.flush()
        job.status, job.epoch, job.attempts = "running", number, job.attempts + 1
        job.started_at = job.started_at or now
        job.status_message, job.wait_reasons, job.not_before, job.progress = None, None, None, None
        add_op(self.ops, session, "job_start", SYSTEM_ACTOR, job, controller_id=decision.controller_id,
               attempt_id=attempt.id)
        r = spec.resources
        run = JobRun(job_id=job.id, attempt_id=attempt.id, number=number, name=job.name, image=spec.image,
                     command=[*spec.command, *spec.args], environment=dict(spec.env), inputs=inputs,
                     memory_limit=r.memory_limit, cpu_limit=r.cpu_limit, gpu_count=r.gpu_count,
                     gpu_device_ids=list(decision.gpu_devices) or None,
                     gpu_memory=r.gpu_memory_bytes or None, timeout=spec.timeout)
        assert decision.controller_id is not None
        return _Start(job.id, attempt.id, decision.controller_id, url, run, held)

    async def _inputs(self, session: Any, job: JobModel) -> list[JobInput] | str:
        """The attempt's inputs by digest and mount path, or why they cannot be had (the job then fails)."""
        spec = parse_spec(job)
        ids = [ref if isinstance(ref, str) else ref.artifact for ref in spec.inputs
               if isinstance(ref, str | ArtifactInput)]
        rows = {a.id: a for a in await session.scalars(select(ArtifactModel).where(ArtifactModel.id.in_(ids)))} \
            if ids else {}
        out = []
        for ref in spec.inputs:
            if isinstance(ref, JobOutputInput):
                found = await output_digest(session, ref.job, ref.path)
                if found is None:
                    return f"input {ref.path!r} of job {ref.job}: that job left no such output"
                out.append(JobInput(digest=found[0], path=ref.as_ or ref.path))
                continue
            artifact_id = ref if isinstance(ref, str) else ref.artifact
            row = rows.get(artifact_id)
            if row is None:
                return f"input artifact {artifact_id} is gone"
            path = ref.path if isinstance(ref, ArtifactInput) and ref.path else row.name
            out.append(JobInput(digest=row.digest, path=path))
        return out

    async def _run(self, start: _Start) -> None:
        """Ask the controller; a refusal or silence fails this attempt (see the module's docstring for when that
        counts against the job's retries)."""
        counted = False
        try:
            await self.client.run_job(start.controller_id, start.url, start.run)
            return
        except HubError as exc:
            error = exc.message
            counted = isinstance(exc, ControllerRejected) and exc.code not in PASSING_REFUSALS
        except Exception as exc:  # noqa: BLE001 - whatever it was, the job must not stay running on nothing
            error = f"{type(exc).__name__}: {exc}"
        log.warning("job %s attempt %d: controller %s refused or could not be reached: %s", start.job_id,
                    start.run.number, start.controller_id, error)
        self.placement.release(start.held)
        self.placement.avoid(start.controller_id)
        await self.unstart(start.job_id, start.attempt_id, start.run.number, start.controller_id, error,
                           counted=counted)

    async def unstart(self, job_id: str, attempt_id: str, number: int, controller_id: str, error: str, *,
                      counted: bool = False) -> None:
        """The attempt did not start: failed. ``counted`` (the controller refused the job itself), or past
        ``MAX_UNCOUNTED_STARTS`` uncounted ones, it counts against the job's retries (with their backoff; the job
        fails with the controller's error when none are left); else the job is placed again at once."""
        lock = not self.db.is_sqlite
        failed_in: str | None = None
        async with self.db.session() as session:
            job = await lock_job(session, job_id, lock)
            attempt = await session.get(JobAttemptModel, attempt_id, with_for_update=lock, populate_existing=True)
            if attempt is None or attempt.status not in ("starting", "running"):
                return
            now = utcnow()
            if not counted:
                uncounted = int(await session.scalar(select(func.count()).select_from(JobAttemptModel).where(
                    JobAttemptModel.job_id == job_id, JobAttemptModel.id != attempt_id,
                    JobAttemptModel.error.like(f"{NOT_STARTED}%"))) or 0)
                counted = uncounted >= MAX_UNCOUNTED_STARTS
            attempt.status, attempt.finished_at = "failed", now
            attempt.error = f"could not start: {error}" if counted else f"{NOT_STARTED}{error}"
            if job is None or job.status != "running" or job.epoch != number:
                return
            job.progress = None
            if not counted:
                job.status = "pending"
                job.status_message = f"attempt {number} could not start on {controller_id}: {error}; placing it again"
                add_op(self.ops, session, "job_start", SYSTEM_ACTOR, job, error=error, controller_id=controller_id)
            elif job.retries > 0:
                job.retries -= 1
                delay = backoff(job.attempts)
                job.status, job.not_before = "pending", now + timedelta(seconds=delay)
                job.status_message = f"attempt {number} could not start on {controller_id}: {error}; " \
                                     f"retrying in {delay:g} s"
                add_op(self.ops, session, "job_retry", SYSTEM_ACTOR, job, error=error, controller_id=controller_id,
                       retry_in=delay)
            else:
                job.status, job.finished_at = "failed", now
                job.status_message = f"attempt {number} could not start on {controller_id}: {error}"
                add_op(self.ops, session, "job_failed", SYSTEM_ACTOR, job, error=error, controller_id=controller_id)
                failed_in = job.pipeline_id
        if failed_in is not None:
            await pipelines.settle_ids(self.db, self.ops, [failed_in])


async def _made_most(session: Any, inputs: list[JobInput]) -> str | None:
    """The controller whose succeeded attempts made the most bytes of ``inputs``: it keeps what its jobs left
    in its model cache, so an attempt placed there mounts them without a fetch (None: none was made by a job)."""
    digests = list({item.digest for item in inputs})
    if not digests:
        return None
    made = (select(JobAttemptModel.controller_id, ArtifactModel.digest, ArtifactModel.size)
            .join(JobAttemptModel, JobAttemptModel.id == ArtifactModel.attempt_id)
            .where(ArtifactModel.digest.in_(digests), JobAttemptModel.status == "succeeded")
            .distinct().subquery())
    row = (await session.execute(
        select(made.c.controller_id).group_by(made.c.controller_id)
        .order_by(func.sum(made.c.size).desc(), made.c.controller_id).limit(1))).first()
    return None if row is None else row[0]
