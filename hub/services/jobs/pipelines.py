"""Pipelines: a DAG of jobs submitted as one spec (docs/API.md, Pipelines). A pipeline is a ``pipelines`` row and
one ``jobs`` row per step, made in one transaction; the jobs queue runs the steps (a job starts once every job in
its ``needs`` has succeeded), and this module validates, submits, cancels, retries and follows them.

Invariants: a step's job ``needs`` the jobs of the steps it names in ``needs`` and of those whose outputs it takes,
and its spec names those outputs as ``{job, path, as}``; the pipeline's status is derived from its steps' (and
stored when it changes); a pending step that needs a step which ended without succeeding is cancelled, so the
queue holds no job that can never start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Database
from hub.errors import Conflict, HubError, NotFound
from hub.job_schemas import JobOutputInput, JobSpec, PipelineOut, PipelineSpec, PipelineStep, StepOutputInput
from hub.models import JobAttemptModel, JobModel, PipelineModel, UserModel, new_id, utcnow
from hub.scheduler import dag
from hub.services.jobs.core import add_op, job_out, stop_attempts
from hub.services.operations import OperationLog
from hub.services.users import SYSTEM_ACTOR

if TYPE_CHECKING:
    from hub.deps import Hub

log = logging.getLogger(__name__)

PIPELINE_FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# A step that ended so stops every step after it.
STEP_STOPPED: frozenset[str] = frozenset({"failed", "timed_out", "cancelled"})


class UnknownStep(HubError):
    status_code = 422
    code = "UNKNOWN_STEP"


class PipelineCycle(HubError):
    status_code = 422
    code = "PIPELINE_CYCLE"


class PipelineRunning(Conflict):
    code = "PIPELINE_RUNNING"


class NothingToRetry(Conflict):
    code = "NOTHING_TO_RETRY"


def pipeline_not_found(pipeline_id: str) -> NotFound:
    return NotFound(f"pipeline {pipeline_id!r} not found", code="PIPELINE_NOT_FOUND")


# ---------------------------------------------------------------------------------------------------------------
# The spec's graph, pure.

def step_graph(spec: PipelineSpec) -> dict[str, list[str]]:
    """Each step and the steps it needs: those in its ``needs`` and those whose outputs it takes, in order."""
    return {step.name: list(dict.fromkeys(
        [*step.needs, *(i.step for i in step.inputs if isinstance(i, StepOutputInput))]))
        for step in spec.steps}


def check_graph(spec: PipelineSpec) -> dict[str, list[str]]:
    """The spec's graph, once every step it names exists (``UnknownStep``) and it has no cycle (``PipelineCycle``)."""
    graph = step_graph(spec)
    missing = dag.unknown(graph)
    if missing:
        names = ", ".join(sorted({need for _, need in missing}))
        raise UnknownStep(f"the pipeline has no step named {names}",
                          [{"step": node, "needs": need} for node, need in missing])
    cycle = dag.find_cycle(graph)
    if cycle is not None:
        raise PipelineCycle(f"the steps form a cycle: {' -> '.join(cycle)}", {"cycle": cycle})
    return graph


@dataclass(frozen=True)
class StepState:
    """What a pipeline's status is derived from: a step's job's status, whether it ever started, and the steps
    of the same pipeline it needs."""

    name: str
    status: str
    needs: tuple[str, ...] = ()
    started: bool = False


def stopped_steps(steps: Sequence[StepState]) -> set[str]:
    """The pending steps that can never start: they need, directly or not, a step that ended unsucceeded."""
    graph = {s.name: s.needs for s in steps}
    ended = [s.name for s in steps if s.status in STEP_STOPPED]
    pending = {s.name for s in steps if s.status == "pending"}
    return (dag.downstream(graph, ended) & pending) if ended else set()


def pipeline_status(steps: Sequence[StepState]) -> str:
    """``running`` while a step runs or could still start once one has started; ``pending`` before any has;
    ``succeeded`` when all did; else, once nothing can run any more, ``failed`` when a step failed or timed out,
    ``cancelled`` when steps were cancelled."""
    statuses = [s.status for s in steps]
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    stopped = stopped_steps(steps)
    live = [s for s in steps if s.status == "running" or (s.status == "pending" and s.name not in stopped)]
    if live:
        started = any(s.started or s.status != "pending" for s in steps)
        return "running" if started else "pending"
    if any(s in ("failed", "timed_out") for s in statuses):
        return "failed"
    return "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# Reads.

def _states(jobs: Sequence[JobModel]) -> list[StepState]:
    steps = {j.id: j.step or j.id for j in jobs}
    return [StepState(steps[j.id], j.status, tuple(steps[n] for n in j.needs if n in steps),
                      j.attempts > 0 or j.started_at is not None) for j in jobs]


def _in_spec_order(pipeline: PipelineModel, jobs: Iterable[JobModel]) -> list[JobModel]:
    order = {step["name"]: i for i, step in enumerate(pipeline.spec.get("steps", []))}
    return sorted(jobs, key=lambda j: (order.get(j.step or "", len(order)), j.created_at, j.id))


async def _jobs_of(session: AsyncSession, pipeline_ids: Sequence[str], lock: bool = False) -> dict[str, list[JobModel]]:
    query = select(JobModel).where(JobModel.pipeline_id.in_(pipeline_ids)).order_by(JobModel.id)
    if lock:
        query = query.with_for_update(of=JobModel).execution_options(populate_existing=True)
    found: dict[str, list[JobModel]] = {pid: [] for pid in pipeline_ids}
    for job in (await session.scalars(query)).unique():
        found[job.pipeline_id or ""].append(job)
    return found


async def _owned(session: AsyncSession, user: UserModel, pipeline_id: str, lock: bool = False) -> PipelineModel:
    query = select(PipelineModel).where(PipelineModel.id == pipeline_id)
    if lock:
        query = query.with_for_update(of=PipelineModel).execution_options(populate_existing=True)
    pipeline = (await session.scalars(query)).unique().one_or_none()
    if pipeline is None or (pipeline.owner_id != user.id and not user.is_admin):
        raise pipeline_not_found(pipeline_id)
    return pipeline


async def _render(session: AsyncSession, pipelines: Sequence[PipelineModel],
                  jobs: dict[str, list[JobModel]]) -> list[PipelineOut]:
    """The pipelines with their steps' jobs, as ``GET /api/jobs/{id}`` renders them, in the spec's order."""
    job_ids = [j.id for js in jobs.values() for j in js]
    attempts: dict[str, list[JobAttemptModel]] = {jid: [] for jid in job_ids}
    if job_ids:
        for attempt in await session.scalars(select(JobAttemptModel).where(JobAttemptModel.job_id.in_(job_ids))):
            attempts[attempt.job_id].append(attempt)
    return [PipelineOut(
        id=p.id, name=p.name, owner=p.owner.username, spec=p.spec, status=p.status,  # type: ignore[arg-type]
        steps=[job_out(j, attempts[j.id]) for j in _in_spec_order(p, jobs.get(p.id, []))],
        created_at=p.created_at, updated_at=p.updated_at, finished_at=p.finished_at) for p in pipelines]


async def settle(session: AsyncSession, ops: OperationLog, pipeline: PipelineModel, jobs: Sequence[JobModel]) -> None:
    """Bring a pipeline up to date with its steps (their rows locked in this transaction): its pending steps
    that can never start are cancelled, and its status (and ``finished_at``) stored if it changed."""
    stopped = stopped_steps(_states(jobs))
    now = utcnow()
    for job in jobs:
        if job.step in stopped and job.status == "pending":
            job.status, job.finished_at, job.not_before, job.wait_reasons = "cancelled", now, None, None
            job.status_message = "cancelled: a step it needs did not succeed"
            add_op(ops, session, "job_cancelled", SYSTEM_ACTOR, job, pipeline_id=pipeline.id, reason="needs_stopped")
    status = pipeline_status(_states(jobs))
    if status != pipeline.status:
        pipeline.status = status
        pipeline.finished_at = now if status in PIPELINE_FINAL else None
        pipeline.updated_at = now


def _unsettled(pipeline: PipelineModel, jobs: Sequence[JobModel]) -> bool:
    """Whether ``settle`` would change anything (read without locks: only then are the rows locked)."""
    states = _states(jobs)
    return pipeline.status not in PIPELINE_FINAL and (
        bool(stopped_steps(states)) or pipeline_status(states) != pipeline.status)


async def settle_ids(db: Database, ops: OperationLog, pipeline_ids: Iterable[str | None]) -> None:
    """The pipelines of steps that just ended (their transaction committed) brought up to date at once, each in a
    transaction of its own, so that their stored status and ``finished_at`` follow without a read. Rows are locked
    pipeline first, then its jobs, as every writer of both does, and only when something changes. Best effort: a
    read of the pipeline settles what this missed."""
    for pipeline_id in sorted({p for p in pipeline_ids if p}):
        try:
            async with db.session() as session:
                pipeline = await session.scalar(select(PipelineModel).where(PipelineModel.id == pipeline_id))
                if pipeline is None or not _unsettled(pipeline, (await _jobs_of(session, [pipeline_id]))[pipeline_id]):
                    continue
                pipeline = (await session.scalars(
                    select(PipelineModel).where(PipelineModel.id == pipeline_id).with_for_update(of=PipelineModel)
                    .execution_options(populate_existing=True))).unique().one()
                await settle(session, ops, pipeline, (await _jobs_of(session, [pipeline_id], lock=True))[pipeline_id])
        except Exception as exc:  # noqa: BLE001 - the next read of the pipeline settles it
            log.warning("pipeline %s not settled now: %s: %s", pipeline_id, type(exc).__name__, exc)


async def _settled(session: AsyncSession, ops: OperationLog, user: UserModel, pipeline: PipelineModel,
                   jobs: list[JobModel]) -> list[JobModel]:
    """The pipeline's steps, the pipeline settled first when it needs it: its row and its jobs' locked and read
    again, so that a retry or the queue changing them meanwhile is not overwritten."""
    if not _unsettled(pipeline, jobs):
        return jobs
    await _owned(session, user, pipeline.id, lock=True)
    jobs = (await _jobs_of(session, [pipeline.id], lock=True))[pipeline.id]
    await settle(session, ops, pipeline, jobs)
    await session.flush()
    return jobs


async def get(session: AsyncSession, ops: OperationLog, user: UserModel, pipeline_id: str) -> PipelineOut:
    pipeline = await _owned(session, user, pipeline_id)
    jobs = await _settled(session, ops, user, pipeline, (await _jobs_of(session, [pipeline.id]))[pipeline.id])
    [out] = await _render(session, [pipeline], {pipeline.id: jobs})
    return out


async def list_pipelines(session: AsyncSession, ops: OperationLog, user: UserModel, *, status: str | None = None,
                         name: str | None = None, owner: str | None = None, limit: int = 100,
                         offset: int = 0) -> list[PipelineOut]:
    """The caller's pipelines (an admin's: everyone's, ``owner`` narrows to one user's), oldest first; the
    unfinished ones brought up to date first, so that a filter on the status sees their status now."""
    owned_by = select(UserModel.id).where(UserModel.username == owner).scalar_subquery() if owner else None
    # In id order: each is locked in turn when it needs settling, in the same order by every caller.
    unfinished = select(PipelineModel).where(PipelineModel.status.not_in(PIPELINE_FINAL)).order_by(PipelineModel.id)
    if not user.is_admin:
        unfinished = unfinished.where(PipelineModel.owner_id == user.id)
    if owned_by is not None:
        unfinished = unfinished.where(PipelineModel.owner_id == owned_by)
    live = list((await session.scalars(unfinished)).unique())
    if live:
        live_jobs = await _jobs_of(session, [p.id for p in live])
        for p in live:
            await _settled(session, ops, user, p, live_jobs[p.id])
    query = select(PipelineModel).order_by(PipelineModel.created_at, PipelineModel.id).limit(limit).offset(offset)
    if not user.is_admin:
        query = query.where(PipelineModel.owner_id == user.id)
    if status is not None:
        query = query.where(PipelineModel.status == status)
    if name is not None:
        query = query.where(PipelineModel.name == name)
    if owned_by is not None:
        query = query.where(PipelineModel.owner_id == owned_by)
    pipelines = list((await session.scalars(query)).unique())
    return await _render(session, pipelines, await _jobs_of(session, [p.id for p in pipelines]))


# ---------------------------------------------------------------------------------------------------------------
# Submit.

def step_job_spec(step: PipelineStep, job_ids: dict[str, str]) -> JobSpec:
    """A step's JobSpec: its fields but ``needs``, its ``{step, path, as}`` inputs written as ``{job, path, as}``
    of that step's job (``job_ids``: the jobs of the steps it needs, made before it)."""
    inputs: list[Any] = [
        JobOutputInput.model_validate({"job": job_ids[ref.step], "path": ref.path,
                                       **({"as": ref.as_} if ref.as_ else {})})
        if isinstance(ref, StepOutputInput) else ref for ref in step.inputs]
    fields = {name: getattr(step, name) for name in JobSpec.model_fields if name != "inputs"}
    return JobSpec.model_validate({**fields, "inputs": inputs})


async def submit(hub: Hub, user: UserModel, spec: PipelineSpec) -> PipelineOut:
    """One transaction: the pipeline, and each step's job as ``POST /api/jobs`` makes one (its checks, its
    ``job_submit`` operation), in an order where a step's job is made after those it needs. A refused spec (an
    unknown step, a cycle, a step the jobs' checks refuse) changes nothing."""
    assert hub.jobs is not None
    graph = check_graph(spec)
    steps = {step.name: step for step in spec.steps}
    async with hub.db.session() as session:
        now = utcnow()
        pipeline = PipelineModel(id=new_id(), name=spec.name, owner_id=user.id,
                                 spec=spec.model_dump(mode="json", by_alias=True), status="pending",
                                 created_at=now, updated_at=now)
        pipeline.owner = user
        session.add(pipeline)
        await session.flush()
        job_ids: dict[str, str] = {}
        jobs = []
        for name in dag.topological_order(graph):
            job = await hub.jobs.prepare(session, user, step_job_spec(steps[name], job_ids),
                                         needs=[job_ids[s] for s in graph[name]], pipeline_id=pipeline.id, step=name)
            job_ids[name] = job.id
            jobs.append(job)
        [out] = await _render(session, [pipeline], {pipeline.id: jobs})
    hub.jobs.changed()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cancel and retry.

async def cancel(hub: Hub, user: UserModel, pipeline_id: str) -> PipelineOut:
    """Every unfinished step cancelled as ``POST /api/jobs/{id}/cancel`` cancels a job; the controllers of the
    running ones told once it is committed. A finished pipeline is answered as it is."""
    assert hub.jobs is not None
    lives = []
    async with hub.db.session() as session:
        pipeline = await _owned(session, user, pipeline_id, lock=True)
        jobs = (await _jobs_of(session, [pipeline.id], lock=True))[pipeline.id]
        for job in jobs:
            if job.status in ("pending", "running"):
                _, live = await hub.jobs.cancel(session, user, job.id)
                if live is not None:
                    lives.append(live)
        await settle(session, hub.ops, pipeline, jobs)
        await session.flush()
        [out] = await _render(session, [pipeline], {pipeline.id: jobs})
    await stop_attempts(hub.db, hub.client, lives, f"pipeline {pipeline_id}")
    return out


async def retry(hub: Hub, user: UserModel, pipeline_id: str) -> PipelineOut:
    """The steps that failed, timed out or were cancelled, and every step after them, pending again (each runs
    as a new attempt, with its retries as at submit); the succeeded steps they need are not rerun: their outputs
    are taken as they are. 409 ``PIPELINE_RUNNING`` while a step runs or may still start, 409
    ``NOTHING_TO_RETRY`` when every step succeeded."""
    assert hub.jobs is not None
    async with hub.db.session() as session:
        pipeline = await _owned(session, user, pipeline_id, lock=True)
        jobs = (await _jobs_of(session, [pipeline.id], lock=True))[pipeline.id]
        await settle(session, hub.ops, pipeline, jobs)
        if pipeline.status == "succeeded":
            raise NothingToRetry(f"every step of pipeline {pipeline_id!r} succeeded")
        if pipeline.status not in PIPELINE_FINAL:
            raise PipelineRunning(f"pipeline {pipeline_id!r} is {pipeline.status}: cancel it, or wait for its end",
                                  {"status": pipeline.status})
        states = _states(jobs)
        graph = {s.name: s.needs for s in states}
        again = dag.downstream(graph, [s.name for s in states if s.status in STEP_STOPPED])
        # The steps run again count against their owner's jobs, as at submit.
        await hub.jobs.check_quota(session, pipeline.owner, sum(1 for j in jobs if j.step in again))
        now = utcnow()
        for job in jobs:
            if job.step not in again:
                continue
            job.status, job.status_message, job.wait_reasons = "pending", None, None
            job.retries = int(job.spec.get("retries", 0))
            job.not_before = job.started_at = job.finished_at = None
            job.exit_code, job.progress = None, None
            job.updated_at = now
            add_op(hub.ops, session, "job_retry", user.username, job, pipeline_id=pipeline.id,
                   reason="pipeline_retry")
        await settle(session, hub.ops, pipeline, jobs)
        await session.flush()
        [out] = await _render(session, [pipeline], {pipeline.id: jobs})
    hub.jobs.changed()
    return out
