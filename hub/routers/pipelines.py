"""The pipelines API (docs/API.md, Pipelines): thin, over ``hub.services.jobs.pipelines``."""

from __future__ import annotations

from fastapi import APIRouter, Query

from hub.deps import CurrentUser, HubDep, SessionDep
from hub.job_schemas import PipelineOut, PipelineSpec, PipelineStatus
from hub.routers.paging import Limit, Offset
from hub.schemas import NAME_PATTERN
from hub.services.jobs import pipelines

router = APIRouter(prefix="/api/pipelines", tags=["pipelines"])

@router.post("", status_code=201, response_model=PipelineOut, responses={
    404: {"description": "ARTIFACT_NOT_FOUND or JOB_NOT_FOUND: a step's input that is not the caller's"},
    422: {"description": "UNKNOWN_STEP, PIPELINE_CYCLE (details.cycle), or a malformed spec"}})
async def submit_pipeline(spec: PipelineSpec, user: CurrentUser, hub: HubDep) -> PipelineOut:
    return await pipelines.submit(hub, user, spec)


@router.get("", response_model=list[PipelineOut])
async def list_pipelines(user: CurrentUser, hub: HubDep, session: SessionDep, limit: int = Limit, offset: int = Offset,
                         status: PipelineStatus | None = Query(None, description="only the pipelines in this status"),
                         name: str | None = Query(None, max_length=63, pattern=NAME_PATTERN,
                                                  description="only the pipelines of this name"),
                         owner: str | None = Query(None, max_length=64,
                                                   description="only this user's (an admin sees everyone's)")
                         ) -> list[PipelineOut]:
    return await pipelines.list_pipelines(session, hub.ops, user, status=status, name=name, owner=owner, limit=limit,
                                          offset=offset)


@router.get("/{pipeline_id}", response_model=PipelineOut)
async def get_pipeline(pipeline_id: str, user: CurrentUser, hub: HubDep, session: SessionDep) -> PipelineOut:
    return await pipelines.get(session, hub.ops, user, pipeline_id)


@router.post("/{pipeline_id}/cancel", response_model=PipelineOut)
async def cancel_pipeline(pipeline_id: str, user: CurrentUser, hub: HubDep) -> PipelineOut:
    return await pipelines.cancel(hub, user, pipeline_id)


@router.post("/{pipeline_id}/retry", response_model=PipelineOut, responses={
    409: {"description": "PIPELINE_RUNNING: a step runs or may still start; NOTHING_TO_RETRY: all succeeded"}})
async def retry_pipeline(pipeline_id: str, user: CurrentUser, hub: HubDep) -> PipelineOut:
    return await pipelines.retry(hub, user, pipeline_id)
