"""``/jobs``: batch jobs' attempts on this controller (``controller.jobs.JobRunner``), as the hub drives them:
run one, long-poll their states, read an ended one's log and outputs, cancel, and delete once collected."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse

from controller.errors import NotFound
from controller.jobs import ALL_LINES, JobRunner
from mmanager.streams import ClosingStreamingResponse
from mmanager.wire import JobOutputs, JobRun, JobRunInfo, JobRunList

router = APIRouter(prefix="/jobs", tags=["jobs"])


class OutputFile(FileResponse):
    """An output's bytes read a MiB at a time: each read is a thread hop, and the hub hashes what it gets a MiB
    at a time too, so Starlette's 64 KiB reads would only multiply the hops."""

    chunk_size = 1024**2


# The longest a long poll is held.
MAX_WAIT = 60.0


async def get_jobs(request: Request) -> JobRunner:
    """The runner, once it has picked up the runs of before a restart: until then no run may look missing."""
    jobs: JobRunner = request.app.state.jobs
    await jobs.ready()
    return jobs


JobsDep = Annotated[JobRunner, Depends(get_jobs)]


@router.post("", response_model=JobRunInfo, status_code=201)
async def run(body: JobRun, jobs: JobsDep, response: Response) -> JobRunInfo:
    info, created = await jobs.run(body)
    if not created:
        response.status_code = 200
    return info


@router.get("", response_model=JobRunList)
async def list_runs(
    jobs: JobsDep,
    since: Annotated[int | None, Query(description="answer once the version differs from this one")] = None,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for a change")] = 0,
) -> JobRunList:
    return await jobs.list(since, wait)


@router.get("/{attempt_id}", response_model=JobRunInfo)
async def get_run(attempt_id: str, jobs: JobsDep) -> JobRunInfo:
    return await jobs.get(attempt_id)


@router.get("/{attempt_id}/logs", response_class=PlainTextResponse)
async def logs(
    attempt_id: str,
    jobs: JobsDep,
    lines: Annotated[int | None, Query(ge=0, le=ALL_LINES, description="the last N lines; all by default")] = None,
    follow: bool = False,
) -> Response:
    kept = jobs.log_file(attempt_id)
    container_id = jobs.container_of(attempt_id)
    if kept is None and container_id is not None:
        runtime, tail = jobs.runtime, ALL_LINES if lines is None else lines
        try:
            if follow:
                stream = await runtime.follow_logs(container_id, tail)
                return ClosingStreamingResponse(stream, media_type="text/plain; charset=utf-8")
            return PlainTextResponse(await runtime.logs(container_id, tail))
        except NotFound:
            # Ended and removed since: its log was kept first.
            kept = jobs.log_file(attempt_id)
    if kept is None:
        return PlainTextResponse("")  # not started yet
    return PlainTextResponse(await asyncio.to_thread(_tail, kept, lines))


def _tail(path: Path, lines: int | None) -> bytes:
    with open(path, "rb") as source:
        if lines is None:
            return source.read()
        return b"".join(deque(source, maxlen=lines)) if lines else b""


@router.get("/{attempt_id}/outputs", response_model=JobOutputs)
async def outputs(attempt_id: str, jobs: JobsDep) -> JobOutputs:
    return await jobs.outputs(attempt_id)


@router.get("/{attempt_id}/outputs/{path:path}")
async def output_file(attempt_id: str, path: str, jobs: JobsDep) -> FileResponse:
    return OutputFile(await jobs.output_file(attempt_id, path), media_type="application/octet-stream")


@router.post("/{attempt_id}/cancel", response_model=JobRunInfo)
async def cancel(attempt_id: str, jobs: JobsDep) -> JobRunInfo:
    return await jobs.cancel(attempt_id)


@router.delete("/{attempt_id}", status_code=204)
async def delete(attempt_id: str, jobs: JobsDep) -> Response:
    await jobs.delete(attempt_id)
    return Response(status_code=204)
