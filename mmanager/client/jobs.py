"""The SDK's batch calls (docs/SDK.md, "Jobs, artifacts and pipelines"): the namespaces ``jobs``,
``artifacts`` and ``pipelines``, each call written once as steps (``mmanager.client.calls``) and typed with
the hub's own wire models (``hub.job_schemas``).

Invariant: a job or a pipeline is named by its id or by a name of the caller's own (the newest of that
name; ``owner/name`` for an admin); a wait polls the record until it reaches a final status and hands each
poll to ``progress``, riding out a hub that is briefly away, and answers the record whatever its final
status (a failed job is no ``ApiError``). A download lands whole and checked against the artifact's sha256,
or not at all (``mmanager.client.transport``), and never outside the folder it was given.
"""

from __future__ import annotations

import builtins
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from hub.job_schemas import JOB_FINAL, ArtifactOut, JobOut, JobSpec, PipelineOut, PipelineSpec
from mmanager.client.api import PAGE, POLL_MOST, RETRY_FIRST, RETRY_FOR, RETRY_MOST, _away, _me, _seg
from mmanager.client.calls import Bound, Call, Download, M, Notify, Pause, Steps, Upload, op, stream
from mmanager.client.errors import ApiError

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)

# A job's or a pipeline's id as the hub makes them; anything else is a name.
_ID = re.compile(r"[0-9a-f]{32}")
# A pipeline's final statuses (hub.job_schemas.PipelineStatus).
PIPELINE_FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# Seconds between two polls of a job or a pipeline, from the first to the most: a job runs for a while, so
# the polls slow down sooner than an operation's.
JOB_POLL_FIRST, JOB_POLL_MOST = 0.2, max(POLL_MOST, 2.0)

# The lines a followed log opened again after a quiet spell starts with: none, only those still to come (as
# the services' logs resume).
RESUME_TAIL = 0

JobProgress = Callable[[JobOut], Any]
PipelineProgress = Callable[[PipelineOut], Any]
ByteProgress = Callable[[int, int], Any]


def _spec(spec: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """A spec as the hub takes it: a model dumped with its wire names (an input's ``as``), a dict as it is."""
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dict(spec)


def _newest(rows: builtins.list[dict[str, Any]]) -> dict[str, Any]:
    def made(row: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(str(row["created_at"]).replace("Z", "+00:00"))
    return max(rows, key=made)


def _safe_path(name: str) -> str:
    """An artifact's path as a path under a download folder: relative, no ``..`` (the hub's rule for
    ``/outputs``; a hub answering otherwise is refused, not followed out of the folder)."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name or "\\" in name:
        raise ApiError(0, "BAD_ANSWER", f"the artifact's path {name!r} is not a relative path")
    return os.path.join(*parts)


class _Named(Bound[M]):
    """What jobs and pipelines share: a record named by its id or by a name of the caller's own."""

    kind = ""
    path = ""
    code = ""
    model: type[BaseModel] = BaseModel

    def _by_name(self, ref: str) -> Steps[str]:
        owner, _, name = ref.rpartition("/")
        if not owner:
            owner = (yield from _me(self._runner)).username
        found = yield Call("GET", self.path, params={"name": name, "owner": owner, "limit": PAGE})
        # Also where the hub's list takes no ``owner`` (an admin's list holds everyone's).
        found = [row for row in found if row.get("owner") == owner and row.get("name") == name]
        if not found:
            raise ApiError(404, self.code, f"{owner} has no {self.kind} named {name!r}")
        return str(_newest(found)["id"])

    def _on(self, ref: str, steps: Callable[[str], Steps[T]]) -> Steps[T]:
        """``steps`` run on the id ``ref`` names. An id-shaped ref is tried as an id first; answered 404, it
        may still be a name."""
        if not _ID.fullmatch(ref):
            return (yield from steps((yield from self._by_name(ref))))
        try:
            return (yield from steps(ref))
        except ApiError as exc:
            if exc.status != 404:
                raise
            missing = exc
        try:
            found = yield from self._by_name(ref)
        except ApiError as exc:
            if exc.status == 404:
                raise missing from None
            raise
        return (yield from steps(found))

    def _call(self, ref: str, method: str = "GET", tail: str = "", **call: Any) -> Steps[Any]:
        """``METHOD {path}/{id}{tail}`` of the record ``ref`` names."""
        def steps(found: str) -> Steps[Any]:
            return (yield Call(method, f"{self.path}/{_seg(found)}{tail}", **call))
        return (yield from self._on(ref, steps))

    def _poll(self, ref: str, final: frozenset[str], progress: Callable[[Any], Any] | None,
              timeout: float | None) -> Steps[Any]:
        """The record, polled until its status is final; ``progress`` gets each poll. Past ``timeout``:
        ``WAIT_TIMEOUT`` with ``details.id`` (it goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        found = ref if _ID.fullmatch(ref) else (yield from self._by_name(ref))
        record: Any = self.model.model_validate((yield from self._call(found)))
        found = record.id
        delay, retry = JOB_POLL_FIRST, RETRY_FIRST
        away_since: float | None = None
        while True:
            if progress is not None:
                yield Notify(progress, record)
            if record.status in final:
                return record
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ApiError(0, "WAIT_TIMEOUT", f"{self.kind} {found} is still {record.status} after {timeout} s "
                                                  "(it goes on)", {"id": found})
            yield Pause(delay if deadline is None else max(0.0, min(delay, deadline - now)))
            delay = min(delay * 1.5, JOB_POLL_MOST)
            try:
                body = yield Call("GET", f"{self.path}/{_seg(found)}")
            except ApiError as exc:
                now = time.monotonic()
                away_since = now if away_since is None else away_since
                if not _away(exc) or now - away_since >= RETRY_FOR:
                    raise
                yield Pause(retry)
                retry = min(retry * 2, RETRY_MOST)
                continue
            away_since, retry = None, RETRY_FIRST
            record = self.model.model_validate(body)


class JobsApi(_Named[M]):
    """``client.jobs``: batch jobs, named by id or by a name of the caller's own (the newest of that name)."""

    kind, path, code, model = "job", "/api/jobs", "JOB_NOT_FOUND", JobOut
    _artifacts: ArtifactsApi[M]

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self._artifacts = ArtifactsApi[M](runner)

    @op
    def submit(self, spec: Mapping[str, Any] | JobSpec, wait: bool = False, progress: JobProgress | None = None,
               timeout: float | None = None) -> Steps[JobOut]:
        """Queue a job (``POST /api/jobs``). ``wait``: the job once it has ended, ``progress`` called with
        each poll's ``JobOut`` (its ``progress``, ``status_message`` while it waits); ``timeout`` bounds the
        wait (``WAIT_TIMEOUT``; the job goes on)."""
        job = JobOut.model_validate((yield Call("POST", "/api/jobs", json=_spec(spec))))
        if wait:
            return (yield from self._poll(job.id, JOB_FINAL, progress, timeout))
        if progress is not None:
            yield Notify(progress, job)
        return job

    @op
    def list(self, status: str | None = None, name: str | None = None, owner: str | None = None,
             pipeline_id: str | None = None, limit: int = 100, offset: int = 0) -> Steps[builtins.list[JobOut]]:
        """The caller's jobs (an admin: everyone's, or ``owner``'s)."""
        body = yield Call("GET", "/api/jobs", params={"status": status, "name": name, "owner": owner,
                                                      "pipeline_id": pipeline_id, "limit": limit, "offset": offset})
        return [JobOut.model_validate(j) for j in body]

    @op
    def get(self, ref: str) -> Steps[JobOut]:
        """The job with its attempts."""
        return JobOut.model_validate((yield from self._call(ref)))

    @op
    def cancel(self, ref: str) -> Steps[JobOut]:
        """Stop it (``JOB_FINISHED`` when it has already ended)."""
        return JobOut.model_validate((yield from self._call(ref, "POST", "/cancel")))

    @op
    def wait(self, ref: str, progress: JobProgress | None = None, timeout: float | None = None) -> Steps[JobOut]:
        """The job once it has ended (look at its ``status``)."""
        return (yield from self._poll(ref, JOB_FINAL, progress, timeout))

    @op
    def logs(self, ref: str, attempt: int | None = None, tail: int | None = None) -> Steps[str]:
        """An attempt's log (default the current one): live while it runs, kept after."""
        return str((yield from self._call(ref, tail="/logs", params={"attempt": attempt, "tail": tail},
                                          read="text")))

    @stream
    def follow_logs(self, ref: str, attempt: int | None = None, tail: int | None = None) -> Steps[Call]:
        """The log's lines as they come, until the attempt ends or the stream is closed (``close()``, a
        ``with`` block; async: ``aclose()``, ``async with``)."""
        def exists(found: str) -> Steps[str]:
            yield Call("GET", f"/api/jobs/{_seg(found)}", read="none")
            return found
        job_id = yield from self._on(ref, exists)
        return Call("GET", f"/api/jobs/{_seg(job_id)}/logs", params={"attempt": attempt, "tail": tail,
                                                                      "follow": True},
                    read="text", resume={"tail": RESUME_TAIL})

    @op
    def artifacts(self, ref: str, attempt: int | None = None) -> Steps[builtins.list[ArtifactOut]]:
        """Its outputs: the succeeded attempt's, else the last one's (``attempt``: that one's)."""
        body = yield from self._call(ref, tail="/artifacts", params={"attempt": attempt})
        return [ArtifactOut.model_validate(a) for a in body]

    @op
    def download(self, job: str | ArtifactOut, dest: str | os.PathLike[str] = ".", path: str | None = None,
                 attempt: int | None = None, progress: ByteProgress | None = None) -> Steps[builtins.list[Path]]:
        """Save a job's outputs under the folder ``dest``, each at its path under ``/outputs`` (``path``:
        only that one, or those under that folder); or one ``ArtifactOut`` (``dest``: a folder, or the
        file's path). Each file is checked against its sha256. The paths written."""
        if isinstance(job, ArtifactOut):
            return [(yield from self._artifacts._save(job, dest, progress))]
        body = yield from self._call(job, tail="/artifacts", params={"attempt": attempt})
        rows = [ArtifactOut.model_validate(a) for a in body]
        if path is not None:
            wanted = path.strip("/")
            rows = [a for a in rows if a.path == wanted or a.path.startswith(wanted + "/")]
            if not rows:
                raise ApiError(404, "ARTIFACT_NOT_FOUND", f"job {job} has no output at {path!r}")
        folder = Path(dest)
        saved: builtins.list[Path] = []
        for artifact in rows:
            saved.append((yield from self._artifacts._save(artifact, folder / _safe_path(artifact.path), progress)))
        return saved


class ArtifactsApi(Bound[M]):
    """``client.artifacts``: files uploaded as jobs' inputs, and jobs' outputs."""

    def _save(self, artifact: ArtifactOut, dest: str | os.PathLike[str],
              progress: ByteProgress | None) -> Steps[Path]:
        target = Path(dest)
        if target.is_dir():
            target = target / _safe_path(artifact.path)
        yield Call("GET", f"/api/artifacts/{_seg(artifact.id)}/content",
                   download=Download(os.fspath(target), artifact.sha256, artifact.size, progress))
        return target

    @op
    def upload(self, path: str | os.PathLike[str], name: str | None = None,
               progress: ByteProgress | None = None) -> Steps[ArtifactOut]:
        """Send the file at ``path`` as it is read, never whole in memory (``name``: default its file name,
        where a job mounts it under ``/inputs``); ``progress(done_bytes, total_bytes)`` as it goes. The same
        name and bytes uploaded before answer the stored artifact."""
        body = yield Call("POST", "/api/artifacts", params={"name": name or os.path.basename(os.fspath(path))},
                          upload=Upload(os.fspath(path), progress))
        return ArtifactOut.model_validate(body)

    @op
    def list(self, job_id: str | None = None, limit: int = 100, offset: int = 0) -> Steps[builtins.list[ArtifactOut]]:
        body = yield Call("GET", "/api/artifacts", params={"job_id": job_id, "limit": limit, "offset": offset})
        return [ArtifactOut.model_validate(a) for a in body]

    @op
    def get(self, artifact_id: str) -> Steps[ArtifactOut]:
        return ArtifactOut.model_validate((yield Call("GET", f"/api/artifacts/{_seg(artifact_id)}")))

    @op
    def download(self, artifact_id: str, dest: str | os.PathLike[str] = ".",
                 progress: ByteProgress | None = None) -> Steps[Path]:
        """Save an artifact's bytes at ``dest`` (a folder: under its name), streamed to a temporary file
        renamed once whole and checked against its sha256 (``DIGEST_MISMATCH``, and nothing written)."""
        artifact = ArtifactOut.model_validate((yield Call("GET", f"/api/artifacts/{_seg(artifact_id)}")))
        return (yield from self._save(artifact, dest, progress))

    @op
    def delete(self, artifact_id: str) -> Steps[None]:
        """Remove an upload of the caller's own (``ARTIFACT_IN_USE`` while a waiting or running job names it)."""
        yield Call("DELETE", f"/api/artifacts/{_seg(artifact_id)}", read="none")


class PipelinesApi(_Named[M]):
    """``client.pipelines``: DAGs of jobs submitted as one spec, named by id or by a name of the caller's own."""

    kind, path, code, model = "pipeline", "/api/pipelines", "PIPELINE_NOT_FOUND", PipelineOut

    @op
    def submit(self, spec: Mapping[str, Any] | PipelineSpec, wait: bool = False,
               progress: PipelineProgress | None = None, timeout: float | None = None) -> Steps[PipelineOut]:
        """Submit a pipeline (``POST /api/pipelines``); ``wait``: the pipeline once it has ended, ``progress``
        called with each poll's ``PipelineOut`` (its steps' jobs)."""
        pipeline = PipelineOut.model_validate((yield Call("POST", "/api/pipelines", json=_spec(spec))))
        if wait:
            return (yield from self._poll(pipeline.id, PIPELINE_FINAL, progress, timeout))
        if progress is not None:
            yield Notify(progress, pipeline)
        return pipeline

    @op
    def list(self, status: str | None = None, name: str | None = None, owner: str | None = None,
             limit: int = 100, offset: int = 0) -> Steps[builtins.list[PipelineOut]]:
        body = yield Call("GET", "/api/pipelines", params={"status": status, "name": name, "owner": owner,
                                                           "limit": limit, "offset": offset})
        return [PipelineOut.model_validate(p) for p in body]

    @op
    def get(self, ref: str) -> Steps[PipelineOut]:
        """The pipeline with its steps' jobs, in the spec's order."""
        return PipelineOut.model_validate((yield from self._call(ref)))

    @op
    def cancel(self, ref: str) -> Steps[PipelineOut]:
        return PipelineOut.model_validate((yield from self._call(ref, "POST", "/cancel")))

    @op
    def retry(self, ref: str) -> Steps[PipelineOut]:
        """Run its failed or cancelled step again, and the steps after it; the succeeded ones are kept."""
        return PipelineOut.model_validate((yield from self._call(ref, "POST", "/retry")))

    @op
    def wait(self, ref: str, progress: PipelineProgress | None = None,
             timeout: float | None = None) -> Steps[PipelineOut]:
        return (yield from self._poll(ref, PIPELINE_FINAL, progress, timeout))
