"""Following the attempts that run (the leading replica): progress into the rows, an ended attempt collected
and settled, attempts on lost controllers given up, timeouts' backstop.

An ended attempt is collected first (each output streamed into the artifact store and checked against the
sha256 its controller gave; the log), then ONE transaction settles the attempt, its artifact rows and (when it
is the job's current attempt) the job with its operation rows, and only then is the attempt deleted on its
controller. Only the job's current attempt (``number == epoch``, job ``running``) settles the job.

Invariants: nothing of a succeeded attempt is lost when a process is killed: a hub killed mid-collection leaves
the attempt live and its controller keeps it, so the next leader collects again (the store dedups by digest);
the controller deletes it only after the settling transaction committed. Rows change only when what they show
changed. Outputs past MMANAGER_ARTIFACT_MAX_BYTES or the owner's remaining quota (by the controller's manifest,
before any byte is fetched) fail the attempt with OUTPUTS_TOO_LARGE, not retried; a collection that fails
``MAX_COLLECT_FAILURES`` times (or at once when the controller refuses a listed file) fails the attempt, which
then retries per its job's budget. Rows are locked job first, then attempt. The store's bytes that no row names
are removed only by the sweep (``sweep_store``), past a grace, never inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import lazyload

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import ControllerRejected, HubError
from hub.job_schemas import ATTEMPT_LIVE, JOB_FINAL
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel, utcnow
from hub.outage import DatabaseOutage
from hub.services.jobs import pipelines
from hub.services.jobs.artifacts import ArtifactStore, used_bytes
from hub.services.jobs.core import add_op, backoff, lock_job
from hub.services.operations import OperationLog
from hub.services.users import SYSTEM_ACTOR
from mmanager.wire import JOB_RUN_ENDED, JobOutputFile, JobRunInfo

log = logging.getLogger(__name__)

# A live attempt, for the statements sent straight to the driver (no IN list there).
_LIVE = or_(JobAttemptModel.status == "starting", JobAttemptModel.status == "running")
# Seconds past an attempt's timeout after which the hub stops waiting for its controller to report the end.
TIMEOUT_GRACE = 30.0
# Seconds after its row was written past which a live attempt its controller does not list was never started
# there (the hub passes its start's own limit: each try of POST /jobs/ within MMANAGER_CONTROLLER_CREATE_TIMEOUT).
MISSING_GRACE = 370.0
# Failed tries to collect one ended attempt, past which it is settled failed.
MAX_COLLECT_FAILURES = 5
# The store's sweep: how often (seconds), and how old unnamed bytes must be before they go (an upload or a
# collection names its bytes within seconds of putting them).
SWEEP_EVERY = 300.0
SWEEP_GRACE = 3600.0
# What an attempt's error starts with when its outputs were too large to keep (not retried).
OUTPUTS_TOO_LARGE = "OUTPUTS_TOO_LARGE"


class ChecksumMismatch(Exception):
    pass


class OutputUnavailable(Exception):
    """The controller refused a file its own manifest lists: trying again will not help."""


@dataclass
class Collected:
    status: str
    exit_code: int | None
    error: str | None
    outputs: list[tuple[str, str, int]] = field(default_factory=list)
    log_digest: str | None = None
    log_size: int = 0
    # Docker's StartedAt as the controller reported it: a short run can end before any listing saw it run.
    started_at: datetime | None = None
    # The last progress the job wrote (its final count), kept on the attempt and the job.
    progress: dict[str, Any] | None = None
    # Failed for a reason a retry cannot change (the job fails, whatever retries it has left).
    final: bool = False


def verdict(run: JobRunInfo) -> tuple[str, str | None]:
    """The attempt's status from how its run ended, and why when it did not succeed."""
    if run.state == "exited":
        if run.exit_code == 0:
            return "succeeded", None
        return "failed", run.error or f"exited with code {run.exit_code}"
    if run.state == "timed_out":
        return "timed_out", run.error or "stopped at its timeout"
    if run.state == "cancelled":
        return "cancelled", run.error or "cancelled"
    return "failed", run.error or "failed"


class Watcher:
    def __init__(self, db: Database, client: ControllerClient, ops: OperationLog, store: ArtifactStore,
                 wait: float = 10.0, timeout_grace: float = TIMEOUT_GRACE, missing_grace: float = MISSING_GRACE,
                 artifact_max_bytes: int | None = None, artifacts_per_user_bytes: int | None = None,
                 sweep_every: float = SWEEP_EVERY, sweep_grace: float = SWEEP_GRACE,
                 outage: DatabaseOutage | None = None) -> None:
        self.db = db
        # Where an attempt's collection or settling lost to the database being away is told (once per outage,
        # for every attempt of every listing together); None: each one is logged.
        self.outage = outage
        self.client = client
        self.ops = ops
        self.store = store
        self.wait = wait
        self.timeout_grace = timeout_grace
        self.missing_grace = missing_grace
        self.artifact_max_bytes = artifact_max_bytes
        self.artifacts_per_user_bytes = artifacts_per_user_bytes
        self.sweep_every = sweep_every
        self.sweep_grace = sweep_grace
        self._next_sweep = 0.0
        # Failed collections per ended attempt (this leader's count; a new leader starts again).
        self._failures: dict[str, int] = {}
        # Something a dispatcher would want to know at once (a job's end, a job pending again).
        self.changed: Callable[[], None] = lambda: None
        self._polls: dict[str, asyncio.Task[None]] = {}
        # The URL each long poll asks: a controller given a new one (PATCH, a reload) is asked there anew.
        self._poll_urls: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ the tick

    async def tick(self) -> None:
        """Start a long poll for each controller with live attempts (end those with none); give up the
        attempts on lost controllers; the timeouts' backstop."""
        rows = (await self.db.all(select(JobAttemptModel.controller_id, ControllerModel.url, ControllerModel.status)
                                  .select_from(JobAttemptModel)
                                  .join(ControllerModel, ControllerModel.id == JobAttemptModel.controller_id,
                                        isouter=True)
                                  .where(_LIVE).distinct(), {}))
        wanted: dict[str, str] = {}
        lost: list[str] = []
        for r in rows:
            if r["status"] == "unhealthy" or r["url"] is None:
                lost.append(r["controller_id"])
            else:
                wanted[r["controller_id"]] = r["url"]
        for cid in [c for c in self._polls
                    if wanted.get(c) != self._poll_urls.get(c) or self._polls[c].done()]:
            task = self._polls.pop(cid)
            self._poll_urls.pop(cid, None)
            if not task.done():
                task.cancel()
        for cid, url in wanted.items():
            if cid not in self._polls:
                self._polls[cid] = asyncio.create_task(self._poll(cid, url), name=f"job-watch-{cid}")
                self._poll_urls[cid] = url
        if lost:
            await self.give_up(lost)
        await self.backstop()
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.sweep_every
            await self.sweep_store()

    async def stop(self) -> None:
        tasks = list(self._polls.values())
        self._polls.clear()
        self._poll_urls.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _poll(self, controller_id: str, url: str) -> None:
        since = 0
        while True:
            try:
                listing = await self.client.job_runs(controller_id, url, since=since, wait=self.wait if since else 0)
                complete = await self.observe(controller_id, url, listing.runs)
                # What could not be done now (a collection that failed) is tried again at the next answer.
                since = listing.version if complete else 0
                if not complete:
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the poll goes on; silence makes a controller lost, not this
                log.info("job watch of %s: %s: %s", controller_id, type(exc).__name__, exc)
                since = 0
                await asyncio.sleep(1.0)

    # ----------------------------------------------------------------------------------- what runs say

    async def observe(self, controller_id: str, url: str, runs: list[JobRunInfo]) -> bool:
        """Take one listing of a controller's runs in; False when something is left to try again."""
        ids = [r.attempt_id for r in runs]
        async with self.db.session() as session:
            attempts = {a.id: a for a in await session.scalars(select(JobAttemptModel).where(
                JobAttemptModel.controller_id == controller_id,
                or_(JobAttemptModel.id.in_(ids), JobAttemptModel.status.in_(ATTEMPT_LIVE))))}
            # A live attempt its controller does not hold (its request never arrived, or it lost it), past the
            # time a start may take: not started, and its job placed again at once (not counted as a retry).
            cutoff = utcnow() - timedelta(seconds=self.missing_grace)
            listed = set(ids)
            missing = [a for a in attempts.values() if a.id not in listed and a.status in ATTEMPT_LIVE
                       and a.created_at < cutoff]
            if missing:
                await self._vanished(session, missing)
            jobs = {j.id: j for j in await session.scalars(select(JobModel).options(lazyload(JobModel.owner)).where(
                JobModel.id.in_({a.job_id for a in attempts.values()})))} if attempts else {}
            ended, cancels = [], []
            for run in runs:
                attempt = attempts.get(run.attempt_id)
                if attempt is None:
                    continue  # not the hub's (the fence stops it), or settled: deleted below
                job = jobs.get(attempt.job_id)
                current = job is not None and job.status == "running" and job.epoch == attempt.number
                if attempt.status not in ATTEMPT_LIVE:
                    if run.state in JOB_RUN_ENDED:
                        ended.append((run, False))
                    continue
                if run.state in JOB_RUN_ENDED:
                    if run.collectable:
                        ended.append((run, True))
                    continue
                if not current:
                    cancels.append(run.attempt_id)
                self._progress(attempt, job if current else None, run)
        complete = True
        for attempt_id in cancels:
            try:
                await self.client.cancel_job(controller_id, url, attempt_id)
            except HubError as exc:
                log.info("cancel of attempt %s on %s: %s", attempt_id, controller_id, exc)
                complete = False
        for run, live in ended:
            try:
                if live:
                    await self.collect(controller_id, url, run)
                await self.client.delete_job(controller_id, url, run.attempt_id)
                self._failures.pop(run.attempt_id, None)
            except Exception as exc:  # noqa: BLE001 - tried again with the next listing, a few times
                complete = False
                if self._database_away(exc):
                    continue  # the database's outage, not the attempt's: no try of its collection counted
                log.warning("collecting attempt %s on %s: %s: %s", run.attempt_id, controller_id,
                            type(exc).__name__, exc)
                if live:
                    await self._collect_failed(run, exc)
        return complete

    async def _collect_failed(self, run: JobRunInfo, exc: Exception) -> None:
        """Count a failed collection; past the limit (or at once when a listed file is refused) the attempt is
        settled failed (deleted on its controller with the next listing)."""
        failures = self._failures[run.attempt_id] = self._failures.get(run.attempt_id, 0) + 1
        if not isinstance(exc, OutputUnavailable) and failures < MAX_COLLECT_FAILURES:
            return
        self._failures.pop(run.attempt_id, None)
        error = f"its outputs could not be collected ({failures} tries): {type(exc).__name__}: {exc}"
        try:
            await self.settle(run.attempt_id, Collected("failed", run.exit_code, error))
        except Exception as again:  # noqa: BLE001 - the next listing tries again
            if not self._database_away(again):
                log.warning("settling attempt %s: %s: %s", run.attempt_id, type(again).__name__, again)

    def _database_away(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database away, told to the hub's account of the outage (not logged here)."""
        return self.outage is not None and self.outage.failed("job-watcher", exc)

    async def _vanished(self, session: Any, attempts: list[JobAttemptModel]) -> None:
        lock = not self.db.is_sqlite
        now = utcnow()
        for attempt in attempts:
            job = await lock_job(session, attempt.job_id, lock)
            await session.refresh(attempt, with_for_update=lock)
            if attempt.status not in ATTEMPT_LIVE:
                continue
            attempt.status, attempt.finished_at = "failed", now
            attempt.error = f"controller {attempt.controller_id} does not hold this attempt"
            if job is not None and job.status == "running" and job.epoch == attempt.number:
                job.status, job.progress = "pending", None
                job.status_message = f"attempt {attempt.number}: {attempt.error}; placing it again"
                add_op(self.ops, session, "job_start", SYSTEM_ACTOR, job, error=attempt.error,
                       controller_id=attempt.controller_id)
        self.changed()

    @staticmethod
    def _progress(attempt: JobAttemptModel, job: JobModel | None, run: JobRunInfo) -> None:
        progress = run.progress.model_dump(mode="json") if run.progress is not None else None
        if run.state == "running" and attempt.status != "running":
            attempt.status = "running"
        if run.started_at is not None and attempt.started_at != run.started_at:
            attempt.started_at = run.started_at
        if run.container_id and attempt.container_id != run.container_id:
            attempt.container_id = run.container_id
        if progress != attempt.progress:
            attempt.progress = progress
        if job is not None and progress != job.progress:
            job.progress = progress

    # ------------------------------------------------------------------------------------------ collect

    async def collect(self, controller_id: str, url: str, run: JobRunInfo) -> None:
        """Store the ended attempt's outputs and log, then settle it in one transaction."""
        status, error = verdict(run)
        got = Collected(status, run.exit_code, error, started_at=run.started_at,
                        progress=run.progress.model_dump(mode="json") if run.progress is not None else None)
        manifest = await self.client.job_outputs(controller_id, url, run.attempt_id)
        too_large = await self._too_large(run.attempt_id, manifest.files)
        if too_large is not None:
            got.status, got.error, got.final = "failed", too_large, True
        for f in manifest.files if too_large is None else ():
            try:
                stream = await self.client.job_output(controller_id, url, run.attempt_id, f.path)
            except ControllerRejected as exc:
                if exc.status_code < 500:
                    raise OutputUnavailable(f"output {f.path!r}: {exc.message}") from exc
                raise

            def longer(size: int, f: JobOutputFile = f) -> Exception:
                return ChecksumMismatch(f"output {f.path!r} ran past the {f.size} bytes its controller listed")

            try:
                digest, size = await self.store.put(stream, f.size, longer)
            except ChecksumMismatch as exc:
                digest, size, got.error = "", 0, str(exc)
            finally:
                await stream.aclose()
            if digest.removeprefix("sha256:") != f.sha256.removeprefix("sha256:"):
                got.status = "failed"
                if digest:
                    got.error = f"output {f.path!r} arrived with another sha256 than its controller's"
                got.outputs = []
                break
            got.outputs.append((f.path, digest, size))
        logs = await self.client.job_logs(controller_id, url, run.attempt_id)
        try:
            got.log_digest, got.log_size = await self.store.put(logs)
        finally:
            await logs.aclose()
        await self.settle(run.attempt_id, got)

    async def _too_large(self, attempt_id: str, files: list[JobOutputFile]) -> str | None:
        """Why the outputs listed cannot be kept (a file past the per-artifact limit, or more than the owner's
        quota has left), by the sizes the controller listed; None when they fit."""
        if self.artifact_max_bytes is not None:
            for f in files:
                if f.size > self.artifact_max_bytes:
                    return (f"{OUTPUTS_TOO_LARGE}: output {f.path!r} holds {f.size} bytes, more than an artifact "
                            f"may (MMANAGER_ARTIFACT_MAX_BYTES={self.artifact_max_bytes})")
        total = sum(f.size for f in files)
        if self.artifacts_per_user_bytes is None or not total:
            return None
        async with self.db.session() as session:
            owner = await session.scalar(select(JobModel.owner_id).join(
                JobAttemptModel, JobAttemptModel.job_id == JobModel.id).where(JobAttemptModel.id == attempt_id))
            used = await used_bytes(session, owner) if owner is not None else 0
        if used + total > self.artifacts_per_user_bytes:
            return (f"{OUTPUTS_TOO_LARGE}: the outputs hold {total} bytes and the owner's artifacts {used} of "
                    f"their {self.artifacts_per_user_bytes}")
        return None

    async def settle(self, attempt_id: str, got: Collected) -> bool:
        """The attempt, its artifacts and (when current) its job in one transaction; False when another did it."""
        lock = not self.db.is_sqlite
        async with self.db.session() as session:
            attempt = await session.get(JobAttemptModel, attempt_id)
            if attempt is None:
                return False
            job = await lock_job(session, attempt.job_id, lock)
            await session.refresh(attempt, with_for_update=lock)
            if attempt.status not in ATTEMPT_LIVE or job is None:
                return False
            now = utcnow()
            attempt.status, attempt.exit_code, attempt.error = got.status, got.exit_code, got.error
            attempt.finished_at = now
            if got.started_at is not None and attempt.started_at is None:
                attempt.started_at = got.started_at
            attempt.log_digest, attempt.log_size = got.log_digest, got.log_size
            if got.progress is not None:
                attempt.progress = got.progress
            for path, digest, size in got.outputs:
                session.add(ArtifactModel(owner_id=job.owner_id, name=path, digest=digest, size=size, job_id=job.id,
                                          attempt_id=attempt.id, created_at=now))
            pipeline_id = None
            if job.status == "running" and job.epoch == attempt.number:
                if got.progress is not None:
                    job.progress = got.progress
                self._settle_job(session, job, attempt, got, now)
                if job.status in JOB_FINAL:
                    pipeline_id = job.pipeline_id
        self.changed()
        if pipeline_id is not None:
            await pipelines.settle_ids(self.db, self.ops, [pipeline_id])
        return True

    def _settle_job(self, session: Any, job: JobModel, attempt: JobAttemptModel, got: Collected, now: Any) -> None:
        job.exit_code = got.exit_code
        if got.status == "succeeded":
            job.status, job.finished_at, job.status_message = "succeeded", now, None
            add_op(self.ops, session, "job_succeeded", SYSTEM_ACTOR, job, controller_id=attempt.controller_id)
        elif got.status == "cancelled":
            job.status, job.finished_at, job.status_message = "cancelled", now, got.error
            add_op(self.ops, session, "job_cancelled", SYSTEM_ACTOR, job, controller_id=attempt.controller_id)
        elif job.retries > 0 and not got.final:
            job.retries -= 1
            delay = backoff(job.attempts)
            job.status, job.not_before = "pending", now + timedelta(seconds=delay)
            job.status_message = f"attempt {attempt.number} {got.status}: {got.error}; retrying in {delay:g} s"
            add_op(self.ops, session, "job_retry", SYSTEM_ACTOR, job, error=got.error,
                   controller_id=attempt.controller_id, retry_in=delay)
        else:
            job.status, job.finished_at = got.status, now
            job.status_message = f"attempt {attempt.number} {got.status}: {got.error}"
            add_op(self.ops, session, "job_timed_out" if got.status == "timed_out" else "job_failed", SYSTEM_ACTOR,
                   job, error=got.error, controller_id=attempt.controller_id)

    # -------------------------------------------------------------------------------- lost and overdue

    async def give_up(self, controller_ids: list[str]) -> int:
        """The live attempts on controllers the hub declared lost become ``lost``; their jobs (when current)
        pending again at once, not counted as a retry. How many."""
        lock = not self.db.is_sqlite
        n = 0
        async with self.db.session() as session:
            attempts = list(await session.scalars(select(JobAttemptModel).where(
                JobAttemptModel.controller_id.in_(controller_ids), JobAttemptModel.status.in_(ATTEMPT_LIVE))))
            now = utcnow()
            for attempt in attempts:
                # The job's row first, then the attempt's (the order every writer of both keeps).
                job = await lock_job(session, attempt.job_id, lock)
                await session.refresh(attempt, with_for_update=lock)
                if attempt.status not in ATTEMPT_LIVE:
                    continue
                attempt.status, attempt.finished_at = "lost", now
                attempt.error = f"controller {attempt.controller_id} was lost"
                if job is not None and job.status == "running" and job.epoch == attempt.number:
                    job.status, job.progress = "pending", None
                    job.status_message = f"attempt {attempt.number} lost with controller {attempt.controller_id}; " \
                                         "placing it again"
                    add_op(self.ops, session, "job_lost", SYSTEM_ACTOR, job, controller_id=attempt.controller_id)
                n += 1
        if n:
            self.changed()
        return n

    async def backstop(self) -> int:
        """Running attempts past their timeout and the grace with no end reported: cancelled on their controller
        (best effort) and settled ``timed_out``. The timeout runs from the container's start; an attempt not
        started yet (its image still pulling) is given the time its start may take on top."""
        now = utcnow()
        rows = (await self.db.all(select(JobAttemptModel.id, JobAttemptModel.controller_id, JobAttemptModel.started_at,
                                         JobAttemptModel.created_at, JobModel.timeout, ControllerModel.url)
                                  .join(JobModel, JobModel.id == JobAttemptModel.job_id)
                                  .join(ControllerModel, ControllerModel.id == JobAttemptModel.controller_id,
                                        isouter=True)
                                  .where(_LIVE, JobModel.timeout.is_not(None)), {}))
        n = 0
        for r in rows:
            if r["started_at"] is not None:
                deadline = r["started_at"] + timedelta(seconds=r["timeout"] + self.timeout_grace)
            else:
                deadline = r["created_at"] + timedelta(seconds=self.missing_grace + r["timeout"] + self.timeout_grace)
            if deadline > now:
                continue
            if r["url"]:
                with contextlib.suppress(HubError):
                    await self.client.cancel_job(r["controller_id"], r["url"], r["id"])
            if await self.settle(r["id"], Collected("timed_out", None, "no end reported past its timeout")):
                n += 1
        return n

    # -------------------------------------------------------------------------------------------- sweep

    async def sweep_store(self) -> int:
        """Remove the store's bytes that no artifact row and no attempt's log names, once older than the grace
        (what a deleted artifact, a refused upload or a failed collection left); how many went."""
        old = await self.store.stale(self.sweep_grace)
        removed = 0
        for i in range(0, len(old), 500):
            chunk = old[i:i + 500]
            async with self.db.session() as session:
                named = set(await session.scalars(select(ArtifactModel.digest).where(ArtifactModel.digest.in_(chunk))))
                named |= set(await session.scalars(select(JobAttemptModel.log_digest)
                                                   .where(JobAttemptModel.log_digest.in_(chunk))))
            for digest in chunk:
                if digest not in named and await self.store.drop_stale(digest, self.sweep_grace):
                    removed += 1
        if removed:
            log.info("artifact store: removed %d unnamed file(s)", removed)
        return removed
