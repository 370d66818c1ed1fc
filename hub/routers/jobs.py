"""The jobs and artifacts API (docs/API.md, Jobs and Artifacts). A user sees and names only their own jobs and
artifacts; an admin all (what a user may not see does not exist for them: 404)."""

from __future__ import annotations

import contextlib
import logging
import unicodedata
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.deps import CurrentUser, Hub, HubDep, SessionDep
from hub.errors import HubError
from hub.job_schemas import ATTEMPT_LIVE, ArtifactOut, JobOut, JobSpec, JobStatus
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel
from hub.routers.paging import Limit, Offset
from hub.services.jobs import pipelines
from hub.services.jobs.artifacts import (
    ArtifactQuotaExceeded,
    PayloadTooLarge,
    check_name,
    delete_artifact,
    get_artifact,
    outs,
    read_all,
    record_upload,
    used_bytes,
    visible,
)
from hub.services.jobs.core import JobService, stop_attempts
from mmanager.streams import ClosingStreamingResponse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["jobs"])

# The upload's path: the body limit gives it MMANAGER_ARTIFACT_MAX_BYTES rather than the API's small one.
UPLOAD_PATH = "/api/artifacts"


async def get_jobs(hub: HubDep) -> JobService:
    assert hub.jobs is not None
    return hub.jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]


# ------------------------------------------------------------------------------------------------- jobs


@router.post("/jobs", status_code=201, response_model=JobOut,
             responses={404: {"description": "ARTIFACT_NOT_FOUND or JOB_NOT_FOUND: an input that is not the caller's"},
                        409: {"description": "NEVER_FITS: no registered controller could ever run it"},
                        429: {"description": "JOB_QUOTA_EXCEEDED"}})
async def submit(spec: JobSpec, user: CurrentUser, jobs: JobsDep) -> Any:
    return JSONResponse((await jobs.submit(user, spec)).model_dump(mode="json"), status_code=201)


@router.get("/jobs", response_model=list[JobOut])
async def list_jobs(user: CurrentUser, jobs: JobsDep, session: SessionDep, status: JobStatus | None = None,
                    name: str | None = Query(None, max_length=63), owner: str | None = Query(None, max_length=64),
                    pipeline_id: str | None = Query(None, max_length=32), limit: int = Limit,
                    offset: int = Offset) -> Any:
    """Newest first: the caller's own (an admin's: everyone's, ``owner`` narrows)."""
    return await jobs.list_jobs(session, user, status=status, name=name, owner=owner, pipeline_id=pipeline_id,
                           limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, user: CurrentUser, jobs: JobsDep, session: SessionDep) -> Any:
    return await jobs.out(session, await jobs.get(session, user, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut,
             responses={409: {"description": "JOB_FINISHED: it has ended already"}})
async def cancel(job_id: str, user: CurrentUser, jobs: JobsDep, hub: HubDep) -> Any:
    """A pending job is cancelled at once; a running one too, and its controller is told to stop it (its log is
    still collected; a controller out of reach has it stopped when it comes back)."""
    async with hub.db.session() as session:
        job, live = await jobs.cancel(session, user, job_id)
    await stop_attempts(hub.db, hub.client, [live], f"job {job_id}")
    if job.pipeline_id is not None:
        await pipelines.settle_ids(hub.db, hub.ops, [job.pipeline_id])
    async with hub.db.session() as session:
        return await jobs.out(session, await jobs.get(session, user, job_id))


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
async def logs(job_id: str, user: CurrentUser, jobs: JobsDep, hub: HubDep,
               attempt: int | None = Query(None, ge=1), follow: bool = False,
               tail: int | None = Query(None, ge=0, le=100_000)) -> Any:
    """An attempt's log (the current one's by default): its controller's while it runs (``follow`` streams it),
    the kept copy after. ``tail``: the last N lines (0: none, so a follow sends only the lines still to come)."""
    async with hub.db.session() as session:
        job = await jobs.get(session, user, job_id)
        row = await jobs.attempt(session, job, attempt)
        url = await session.scalar(select(ControllerModel.url).where(ControllerModel.id == row.controller_id)) \
            if row is not None and row.status in ATTEMPT_LIVE else None
    if row is None:
        return PlainTextResponse("")
    if row.status in ATTEMPT_LIVE and url:
        # A followed log holds a connection as long as its client wants: one of the services' log slots.
        release = hub.services.log_streams.acquire(user.id, user.username) if follow else None
        try:
            stream = await hub.client.job_logs(row.controller_id, url, row.id, follow=follow, lines=tail)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            stream.on_close(release)
        return ClosingStreamingResponse(stream, media_type="text/plain; charset=utf-8")
    if row.log_digest is None:
        return PlainTextResponse("")
    text = (await read_all(jobs.store, row.log_digest, hub.settings.max_log_bytes)).decode("utf-8", "replace")
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:]) if tail else ""
    return PlainTextResponse(text)


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut])
async def job_artifacts(job_id: str, user: CurrentUser, jobs: JobsDep, session: SessionDep,
                        attempt: int | None = Query(None, ge=1)) -> Any:
    """What an attempt left under /outputs: ``attempt``'s, else the succeeded attempt's, else the last one's."""
    job = await jobs.get(session, user, job_id)
    return await outs(session, await jobs.outputs(session, job, attempt))


# -------------------------------------------------------------------------------------------- artifacts


@router.post("/artifacts", status_code=201, response_model=ArtifactOut,
             responses={200: {"description": "the same name and bytes were uploaded already"},
                        413: {"description": "PAYLOAD_TOO_LARGE: above MMANAGER_ARTIFACT_MAX_BYTES"},
                        507: {"description": "ARTIFACT_QUOTA_EXCEEDED"}})
async def upload(request: Request, user: CurrentUser, hub: HubDep, jobs: JobsDep,
                 name: str = Query(..., min_length=1, max_length=255)) -> Any:
    """The raw body is the file, streamed into the store and hashed as it comes; no database connection is
    held while it streams."""
    check_name(name)
    settings = hub.settings
    async with hub.db.session() as session:
        used = await used_bytes(session, user.id)
    quota_left = settings.artifacts_per_user_bytes - used

    def quota() -> HubError:
        return ArtifactQuotaExceeded(f"{user.username}'s artifacts hold {used} of their "
                                     f"{settings.artifacts_per_user_bytes} bytes; delete some first",
                                     {"used_bytes": used, "limit_bytes": settings.artifacts_per_user_bytes})

    def too_big(size: int) -> HubError:
        if size > settings.artifact_max_bytes:
            return PayloadTooLarge(f"an artifact may hold at most {settings.artifact_max_bytes} bytes",
                                   {"limit_bytes": settings.artifact_max_bytes})
        return quota()

    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        if int(declared) > settings.artifact_max_bytes:
            raise too_big(int(declared))
        if int(declared) > quota_left:
            raise quota()
    digest, size = await jobs.store.put(request.stream(), min(settings.artifact_max_bytes, max(quota_left, 0)),
                                        too_big)
    def over(now_used: int) -> HubError:
        return ArtifactQuotaExceeded(f"{user.username}'s artifacts hold {now_used} of their "
                                     f"{settings.artifacts_per_user_bytes} bytes; delete some first",
                                     {"used_bytes": now_used, "limit_bytes": settings.artifacts_per_user_bytes})

    # Checked again where the row is written, under the user's row lock: uploads streamed side by side each
    # passed the check above against the same bytes left.
    async with hub.db.session() as session:
        row, new = await record_upload(session, user.id, name, digest, size, settings.artifacts_per_user_bytes,
                                       not hub.db.is_sqlite, over)
        out = (await outs(session, [row]))[0]
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if new else 200)


@router.get("/artifacts", response_model=list[ArtifactOut])
async def list_artifacts(user: CurrentUser, session: SessionDep, job_id: str | None = Query(None, max_length=32),
                         limit: int = Limit, offset: int = Offset) -> Any:
    query = visible(select(ArtifactModel), user).order_by(ArtifactModel.created_at.desc(), ArtifactModel.id)
    if job_id:
        query = query.where(ArtifactModel.job_id == job_id)
    return await outs(session, list(await session.scalars(query.limit(limit).offset(offset))))


@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut)
async def get_one(artifact_id: str, user: CurrentUser, session: SessionDep) -> Any:
    return (await outs(session, [await get_artifact(session, artifact_id, user)]))[0]


@router.get("/artifacts/{artifact_id}/content")
async def content(artifact_id: str, user: CurrentUser, hub: HubDep, jobs: JobsDep) -> Any:
    async with hub.db.session() as session:
        row = await get_artifact(session, artifact_id, user)
    return await stream_digest(jobs, row.digest, row.size, row.name.rsplit("/", 1)[-1])


@router.delete("/artifacts/{artifact_id}", status_code=204,
               responses={409: {"description": "ARTIFACT_IN_USE: a pending or running job names it"}})
async def delete(artifact_id: str, user: CurrentUser, jobs: JobsDep, session: SessionDep) -> Response:
    await delete_artifact(session, artifact_id, user)
    return Response(status_code=204)


def content_disposition(filename: str) -> str:
    """An attachment's header for any name (RFC 6266): an ASCII fallback and the UTF-8 name percent-encoded,
    without quotes, backslashes or control characters (an output's name is whatever its job wrote)."""
    clean = "".join(c for c in filename if c not in '"\\' and unicodedata.category(c)[0] != "C") or "download"
    fallback = "".join(c if " " <= c <= "~" else "_" for c in clean)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(clean, safe='')}"


async def stream_digest(jobs: JobService, digest: str, size: int, filename: str) -> ClosingStreamingResponse:
    chunks = await jobs.store.open(digest)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    headers = {"Content-Length": str(size), "X-Artifact-Digest": digest,
               "Content-Disposition": content_disposition(filename)}
    return ClosingStreamingResponse(body(), media_type="application/octet-stream", headers=headers)


async def controller_artifact(hub: Hub, session: AsyncSession, controller_id: str,
                              digest: str) -> ClosingStreamingResponse | None:
    """An artifact's bytes for a controller's download by digest (``controller.model_cache``), or None when no
    live attempt on that controller takes an artifact with that digest as an input (a controller gets only what
    it was asked to run with)."""
    if hub.jobs is None:
        return None
    rows = (await session.execute(select(ArtifactModel.id, ArtifactModel.size, ArtifactModel.job_id,
                                         ArtifactModel.name).where(ArtifactModel.digest == digest))).all()
    if not rows:
        return None
    specs = await session.scalars(select(JobModel.spec).join(JobAttemptModel, JobAttemptModel.job_id == JobModel.id)
                                  .where(JobAttemptModel.controller_id == controller_id,
                                         JobAttemptModel.status.in_(ATTEMPT_LIVE)))
    ids: set[str] = set()
    outputs: set[tuple[str, str]] = set()
    for spec in specs:
        for ref in spec.get("inputs") or ():
            if isinstance(ref, str):
                ids.add(ref)
            elif isinstance(ref, dict) and "artifact" in ref:
                ids.add(ref["artifact"])
            elif isinstance(ref, dict) and "job" in ref:
                outputs.add((ref["job"], ref.get("path", "")))
    for artifact_id, size, job_id, name in rows:
        if artifact_id in ids or (job_id, name) in outputs:
            return await stream_digest(hub.jobs, digest, size, digest.removeprefix("sha256:"))
    return None

