"""Jobs as users see them: submit (validated, inputs resolved, refused at once when it could never run),
list, read, cancel, logs and artifacts; and the operation row that records each state change.

Invariants: a refused submit writes nothing. A job's row, its ``job_submit`` operation and nothing else are
written by one transaction. A user sees and names only their own jobs and artifacts; an admin all. Every change
of a job's status writes one operation row naming it (``job_id``) in the same transaction.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.db import Database
from hub.errors import Conflict, HubError, InvalidRequest, NotFound, SpecForbidden
from hub.job_schemas import ATTEMPT_LIVE, JOB_FINAL, ArtifactInput, AttemptOut, JobOut, JobOutputInput, JobSpec
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel, OperationModel, UserModel, utcnow
from hub.scheduler.placement import NO_GPU_SHARES, PlacementRequest, image_key, place
from hub.scheduler.snapshot import load_views
from hub.services.jobs.artifacts import ArtifactStore
from hub.services.operations import OperationLog
from mmanager.policy import PolicyViolation, check_spec

if TYPE_CHECKING:
    from hub.controller_client import ControllerClient

log = logging.getLogger(__name__)


class JobQuotaExceeded(HubError):
    status_code = 429
    code = "JOB_QUOTA_EXCEEDED"


class NeverFits(Conflict):
    code = "NEVER_FITS"


def job_request(spec: JobSpec) -> PlacementRequest:
    """What placing one attempt of ``spec`` asks."""
    r = spec.resources
    return PlacementRequest(memory=r.memory_bytes, cpu=r.cpu_limit or 0.0, gpu_count=r.gpu_count,
                            server_type=spec.server_type, gpu_model=r.gpu_model,
                            gpu_min_memory=r.gpu_min_memory_bytes, gpu_memory=r.gpu_memory_bytes,
                            image=image_key(spec.image))


def parse_spec(job: JobModel) -> JobSpec:
    return JobSpec.model_validate(job.spec)


def add_op(ops: OperationLog, session: AsyncSession, operation: str, actor: str, job: JobModel, *,
           error: str | None = None, controller_id: str | None = None, **details: Any) -> OperationModel:
    """A job's state change as a finished operation row (``job_id``), in the caller's transaction."""
    op = ops.new(operation, actor, job_id=job.id, controller_id=controller_id, error=error,
                 details={"status": job.status, "attempt": job.epoch or None, **details})
    op.status = "failed" if error else "succeeded"
    op.finished_at = op.created_at
    session.add(op)
    return op


def attempt_out(a: JobAttemptModel) -> AttemptOut:
    return AttemptOut(number=a.number, controller_id=a.controller_id, status=a.status,  # type: ignore[arg-type]
                      exit_code=a.exit_code, error=a.error, log_size=a.log_size, progress=a.progress,  # type: ignore[arg-type]
                      created_at=a.created_at, started_at=a.started_at, finished_at=a.finished_at)


def job_out(job: JobModel, attempts: Iterable[JobAttemptModel] = ()) -> JobOut:
    return JobOut(id=job.id, name=job.name, owner=job.owner.username, spec=job.spec, status=job.status,  # type: ignore[arg-type]
                  status_message=job.status_message, wait_reasons=job.wait_reasons, priority=job.priority,
                  retries=job.retries, timeout=job.timeout, exit_code=job.exit_code, progress=job.progress,  # type: ignore[arg-type]
                  pipeline_id=job.pipeline_id, step=job.step, needs=list(job.needs or ()),
                  attempts=[attempt_out(a) for a in sorted(attempts, key=lambda a: a.number)],
                  created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)


def check_job_policy(settings: HubSettings, spec: JobSpec) -> None:
    """The spec policy as services' specs meet it (image allow-list, environment rules)."""
    try:
        check_spec(settings.spec_policy, image=spec.image, environment=spec.env)
    except PolicyViolation as exc:
        raise SpecForbidden(exc.message, exc.details) from None


def never_fits(views: list[Any], request: PlacementRequest) -> list[dict[str, str]] | None:
    """The rejections when no registered controller could ever run ``request`` (None when one could): each
    controller judged as if it ran nothing and were healthy, enabled and not draining, so only what it is
    (its server type, GPUs, memory, CPUs, container cap) can refuse."""
    empty = [replace(v, enabled=True, draining=False, healthy=True, containers=0, cpu_reserved=0.0,
                     memory_reserved=0, gpus_used=frozenset(), gpu_shared=NO_GPU_SHARES) for v in views]
    decision = place(empty, request)
    if decision.placed:
        return None
    return [r.as_dict() for r in decision.rejections]


class JobService:
    """The jobs' API side; ``changed`` (set by the app) wakes this replica's dispatcher."""

    def __init__(self, db: Database, settings: HubSettings, ops: OperationLog, store: ArtifactStore) -> None:
        self.db = db
        self.settings = settings
        self.ops = ops
        self.store = store
        self.changed: Callable[[], None] = lambda: None

    # ---------------------------------------------------------------------------------------------- submit

    async def prepare(self, session: AsyncSession, user: UserModel, spec: JobSpec, *, needs: Iterable[str] = (),
                      pipeline_id: str | None = None, step: str | None = None) -> JobModel:
        """Validate ``spec`` for ``user`` and add its row and ``job_submit`` operation to ``session`` (the caller
        commits; a pipeline adds its steps so, all in one transaction). Refusals raise before anything is added."""
        check_job_policy(self.settings, spec)
        await self.check_quota(session, user)
        wanted = await self.resolve_inputs(session, user, spec)
        request = job_request(spec)
        views, _ = await load_views(self.db)
        rejections = never_fits(views, request)
        if rejections is not None:
            raise NeverFits("no registered controller could ever run this job, even with nothing else on it",
                            {"rejections": rejections}, code="NEVER_FITS")
        all_needs = list(dict.fromkeys([*wanted, *needs]))
        job = JobModel(name=spec.name, owner_id=user.id, spec=spec.model_dump(mode="json", by_alias=True),
                       status="pending", priority=spec.priority, retries=spec.retries, timeout=spec.timeout,
                       attempts=0, epoch=0, needs=all_needs, pipeline_id=pipeline_id, step=step,
                       created_at=utcnow())
        job.owner = user
        session.add(job)
        await session.flush()
        add_op(self.ops, session, "job_submit", user.username, job, name=spec.name)
        return job

    async def submit(self, user: UserModel, spec: JobSpec) -> JobOut:
        async with self.db.session() as session:
            job = await self.prepare(session, user, spec)
            out = job_out(job)
        self.changed()
        return out

    async def check_quota(self, session: AsyncSession, user: UserModel, adding: int = 1) -> None:
        """429 JOB_QUOTA_EXCEEDED when ``adding`` more pending jobs would take ``user`` past
        MMANAGER_MAX_JOBS_PER_USER pending or running."""
        limit = self.settings.max_jobs_per_user
        count = int(await session.scalar(select(func.count()).select_from(JobModel).where(
            JobModel.owner_id == user.id, JobModel.status.in_(("pending", "running")))) or 0)
        if count + adding > limit:
            raise JobQuotaExceeded(f"user {user.username!r} has {count} jobs pending or running, at most {limit}; "
                                   "wait for some to end or cancel some", {"jobs": count, "limit": limit})

    async def resolve_inputs(self, session: AsyncSession, user: UserModel, spec: JobSpec) -> list[str]:
        """Check every input names the caller's artifact or job output (404 ARTIFACT_NOT_FOUND,
        JOB_NOT_FOUND) and no two share a mount path nor is one inside another's (422 INPUT_PATH_CONFLICT); the job ids it must wait for."""
        artifact_ids = [ref if isinstance(ref, str) else ref.artifact for ref in spec.inputs
                        if isinstance(ref, str | ArtifactInput)]
        job_refs = [ref for ref in spec.inputs if isinstance(ref, JobOutputInput)]
        artifacts: dict[str, ArtifactModel] = {}
        if artifact_ids:
            query = select(ArtifactModel).where(ArtifactModel.id.in_(artifact_ids))
            if not user.is_admin:
                query = query.where(ArtifactModel.owner_id == user.id)
            artifacts = {a.id: a for a in await session.scalars(query)}
            missing = sorted(set(artifact_ids) - set(artifacts))
            if missing:
                raise NotFound(f"input artifact(s) not found: {', '.join(missing)}", {"missing": missing},
                               code="ARTIFACT_NOT_FOUND")
        needs: list[str] = []
        if job_refs:
            ids = sorted({ref.job for ref in job_refs})
            query2 = select(JobModel).where(JobModel.id.in_(ids))
            if not user.is_admin:
                query2 = query2.where(JobModel.owner_id == user.id)
            jobs = {j.id: j for j in await session.scalars(query2)}
            missing = [i for i in ids if i not in jobs]
            if missing:
                raise NotFound(f"input job(s) not found: {', '.join(missing)}", {"missing": missing},
                               code="JOB_NOT_FOUND")
            for job_ref in job_refs:
                producer = jobs[job_ref.job]
                if producer.status in JOB_FINAL and producer.status != "succeeded":
                    raise Conflict(f"input job {producer.id} ended {producer.status}: it has no outputs to give",
                                   {"job": producer.id, "status": producer.status}, code="INPUT_JOB_FAILED")
                if producer.status == "succeeded" and await output_digest(session, producer.id, job_ref.path) is None:
                    raise NotFound(f"job {producer.id} left no output {job_ref.path!r}", {"job": producer.id,
                                   "path": job_ref.path}, code="ARTIFACT_NOT_FOUND")
                if producer.status != "succeeded":
                    needs.append(producer.id)
        paths = []
        for ref in spec.inputs:
            if isinstance(ref, str):
                paths.append(artifacts[ref].name)
            elif isinstance(ref, ArtifactInput):
                paths.append(ref.path or artifacts[ref.artifact].name)
            else:
                paths.append(ref.as_ or ref.path)
        normal = [posixpath.normpath(p).strip("/") for p in paths]
        clashes = sorted({p for p in normal if normal.count(p) > 1})
        # One input inside another's path ('a' and 'a/b'): the controller cannot mount both.
        given = set(normal)
        clashes += sorted(f"{a} and {p}" for p in given for a in given if p.startswith(a + "/"))
        if clashes:
            raise InvalidRequest("two inputs are mounted at the same path under /inputs, or one inside the other",
                                 {"paths": clashes}, code="INPUT_PATH_CONFLICT")
        return list(dict.fromkeys(needs))

    # ------------------------------------------------------------------------------------------------ reads

    async def get(self, session: AsyncSession, user: UserModel, job_id: str) -> JobModel:
        job = await session.get(JobModel, job_id)
        if job is None or not (user.is_admin or job.owner_id == user.id):
            raise NotFound(f"job {job_id!r} not found", {"job": job_id}, code="JOB_NOT_FOUND")
        return job

    async def out(self, session: AsyncSession, job: JobModel) -> JobOut:
        attempts = await session.scalars(select(JobAttemptModel).where(JobAttemptModel.job_id == job.id))
        return job_out(job, attempts)

    async def list_jobs(self, session: AsyncSession, user: UserModel, *, status: str | None, name: str | None,
                   owner: str | None, pipeline_id: str | None, limit: int, offset: int) -> list[JobOut]:
        query = select(JobModel).order_by(JobModel.created_at.desc(), JobModel.id)
        if not user.is_admin:
            query = query.where(JobModel.owner_id == user.id)
        if status:
            query = query.where(JobModel.status == status)
        if name:
            query = query.where(JobModel.name == name)
        if owner:
            query = query.where(JobModel.owner_id.in_(select(UserModel.id).where(UserModel.username == owner)))
        if pipeline_id:
            query = query.where(JobModel.pipeline_id == pipeline_id)
        jobs = list((await session.scalars(query.limit(limit).offset(offset))).unique())
        attempts: dict[str, list[JobAttemptModel]] = {}
        if jobs:
            for a in await session.scalars(select(JobAttemptModel).where(
                    JobAttemptModel.job_id.in_([j.id for j in jobs]))):
                attempts.setdefault(a.job_id, []).append(a)
        return [job_out(j, attempts.get(j.id, ())) for j in jobs]

    async def attempt(self, session: AsyncSession, job: JobModel, number: int | None) -> JobAttemptModel | None:
        """Attempt ``number``, or the current one (None when it never ran); 404 ATTEMPT_NOT_FOUND for a number it
        does not have."""
        wanted = number if number is not None else job.epoch
        if not wanted:
            return None
        row = await session.scalar(select(JobAttemptModel).where(JobAttemptModel.job_id == job.id,
                                                                 JobAttemptModel.number == wanted))
        if row is None and number is not None:
            raise NotFound(f"job {job.id} has no attempt {number}", {"attempt": number}, code="ATTEMPT_NOT_FOUND")
        return row

    async def outputs(self, session: AsyncSession, job: JobModel, number: int | None) -> list[ArtifactModel]:
        """An attempt's outputs: ``number``'s, else the succeeded attempt's, else the last one's that left any."""
        query = select(ArtifactModel).where(ArtifactModel.job_id == job.id).order_by(ArtifactModel.name)
        rows = list(await session.scalars(query))
        attempts = {a.id: a for a in await session.scalars(select(JobAttemptModel).where(
            JobAttemptModel.job_id == job.id))}
        if number is not None:
            return [r for r in rows if r.attempt_id in attempts and attempts[r.attempt_id].number == number]
        won = [a for a in attempts.values() if a.status == "succeeded"]
        if won:
            return [r for r in rows if r.attempt_id == won[0].id]
        numbers = [attempts[r.attempt_id].number for r in rows if r.attempt_id in attempts]
        if not numbers:
            return []
        last = max(numbers)
        return [r for r in rows if r.attempt_id in attempts and attempts[r.attempt_id].number == last]

    # ---------------------------------------------------------------------------------------------- cancel

    async def cancel(self, session: AsyncSession, user: UserModel, job_id: str) -> tuple[JobModel,
                                                                                          JobAttemptModel | None]:
        """Cancel a pending or running job (409 JOB_FINISHED for one that ended): at once in the database; a
        running attempt stays live until the watcher collected its log (the caller tells its controller)."""
        await self.get(session, user, job_id)
        job = await lock_job(session, job_id, not self.db.is_sqlite)
        assert job is not None
        if job.status in JOB_FINAL:
            raise Conflict(f"job {job_id} has ended ({job.status})", {"status": job.status}, code="JOB_FINISHED")
        live = None
        if job.status == "running":
            live = await session.scalar(select(JobAttemptModel).where(
                JobAttemptModel.job_id == job.id, JobAttemptModel.number == job.epoch,
                JobAttemptModel.status.in_(ATTEMPT_LIVE)))
        job.status, job.finished_at = "cancelled", utcnow()
        job.status_message = f"cancelled by {user.username}"
        job.wait_reasons = None
        add_op(self.ops, session, "job_cancelled", user.username, job,
               controller_id=live.controller_id if live else None)
        return job, live


async def stop_attempts(db: Database, client: ControllerClient, attempts: Iterable[JobAttemptModel | None],
                        what: str) -> None:
    """Tell the controllers of cancelled jobs' live attempts to stop them, once the cancel committed. Best effort:
    a controller out of reach (or one gone) is not waited for; the watcher cancels what runs for no running job."""
    live = [a for a in attempts if a is not None]
    if not live:
        return
    async with db.session() as session:
        urls = dict((await session.execute(select(ControllerModel.id, ControllerModel.url).where(
            ControllerModel.id.in_({a.controller_id for a in live})))).all())
    for attempt in live:
        url = urls.get(attempt.controller_id)
        if not url:
            continue
        try:
            await client.cancel_job(attempt.controller_id, url, attempt.id)
        except HubError as exc:
            log.info("%s: controller %s was not told to cancel attempt %s now (%s); the watcher does it later",
                     what, attempt.controller_id, attempt.id, exc)


async def output_digest(session: AsyncSession, job_id: str, path: str) -> tuple[str, int] | None:
    """The digest and size of what job ``job_id``'s succeeded attempt left at ``path`` under /outputs."""
    row = (await session.execute(select(ArtifactModel.digest, ArtifactModel.size).join(
        JobAttemptModel, JobAttemptModel.id == ArtifactModel.attempt_id).where(
        ArtifactModel.job_id == job_id, ArtifactModel.name == path, JobAttemptModel.status == "succeeded"))).first()
    return None if row is None else (row[0], row[1])


async def lock_job(session: AsyncSession, job_id: str, lock: bool) -> JobModel | None:
    """The job's row, fresh, held until the transaction ends (``lock``: PostgreSQL; SQLite writes one at a time)."""
    query = select(JobModel).where(JobModel.id == job_id).execution_options(populate_existing=True)
    if lock:
        query = query.with_for_update(of=JobModel)
    return await session.scalar(query)


def backoff(attempts: int) -> float:
    """Seconds before a retry after the ``attempts``-th attempt failed."""
    return float(min(2 ** attempts, 60))
