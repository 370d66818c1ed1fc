"""Batch jobs' attempts on this controller: ``JobRunner`` runs each one's container with its inputs and
outputs, watches it to its end and keeps what it left until the hub has collected it (docs/API.md,
Controller API: jobs).

An attempt lives in ``MMANAGER_JOB_DIR/<attempt_id>/``: ``request.json`` (the ``JobRun``, without its registry
login), ``outputs/`` (bound read-write at ``/outputs``), ``progress/`` (at ``/run/mmanager``, where the job
rewrites ``progress.json``), a ``stop.json`` once the controller decided to stop it (a cancel, the timeout),
and once its container has ended ``log.txt``, ``outputs.json`` (the manifest) and ``result.json``.
Invariants:

- a folder appears whole (made under ``.tmp/``, renamed into place); the files of an ended attempt are written
  atomically, ``result.json`` last, and its container is removed only after that: an attempt with a result
  is ended and collectable; one without is picked up again from its container after a restart (watched
  while it runs, finished if it ended, ``failed`` if it vanished). Nothing of an ended attempt is lost
  wherever the controller is killed;
- the container is made by ``ContainerService.create`` (admission, GPUs, the pull of a missing image, the
  sync guard), idempotent on the attempt; an older attempt ``number`` than seen for the job is refused;
- one task watches each attempt's container (Docker's wait) and enforces its timeout, counted from
  Docker's ``StartedAt``;
- ``version`` goes up with every change of any attempt, a rewritten progress file included (seen by the
  long poll within ``PROGRESS_CHECK`` seconds): the hub's long poll (``list``) waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from controller.config import ControllerSettings
from controller.containers import ContainerService, JobParts
from controller.errors import (
    ControllerError,
    DockerUnavailable,
    InvalidPath,
    JobDirUnwritable,
    JobRunning,
    JobRunNotFound,
    NotFound,
    StaleEpoch,
)
from controller.model_cache import LABEL_MODELS, models_label
from controller.spec import OwnMount
from mmanager.wire import (
    JOB_RUN_ENDED,
    LABEL_ATTEMPT,
    LABEL_EPOCH,
    LABEL_JOB,
    ContainerCreate,
    ContainerCreated,
    ContainerInfo,
    ImagePulled,
    JobOutputFile,
    JobOutputs,
    JobProgress,
    JobRun,
    JobRunInfo,
    JobRunList,
    JobRunState,
)

log = logging.getLogger(__name__)

# An attempt id names a folder: a plain name (never ".tmp", never "..").
_ATTEMPT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Where the job finds what this controller gives it.
OUTPUTS, PROGRESS_DIR, INPUTS = "/outputs", "/run/mmanager", "/inputs"
PROGRESS_FILE = "progress.json"
# Seconds one Docker wait lasts at most: a timeout is checked again after each.
WAIT_CHUNK = 30.0
# Seconds a stopped job gets between SIGTERM and SIGKILL.
STOP_GRACE = 10
# Seconds before Docker is asked again after it failed to answer.
RETRY_PAUSE = 2.0
# Seconds between looks at the progress files while a long poll waits.
PROGRESS_CHECK = 1.0
# A progress file larger than this is not read (a job's JobProgress is a few dozen bytes).
MAX_PROGRESS_BYTES = 64 * 1024
# Statuses of a container that has not ended ("created" never started: it ends the run as failed).
_LIVE = frozenset({"running", "restarting", "paused"})
# Every line of Docker's log (the bytes kept are still the newest MMANAGER_MAX_LOG_BYTES).
ALL_LINES = 1 << 31


@dataclass
class _Run:
    request: JobRun
    dir: Path
    state: JobRunState = "starting"
    container_id: str | None = None
    exit_code: int | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    collectable: bool = False
    log_bytes: int = 0
    gpu_device_ids: list[str] = field(default_factory=list)
    image_pull: ImagePulled | None = None
    # Why this controller stops it (``cancelled``, ``timed_out``): the state it ends in.
    stopping: JobRunState | None = None
    task: asyncio.Task[None] | None = None

    @property
    def attempt_id(self) -> str:
        return self.request.attempt_id

    def info(self, progress: JobProgress | None = None, pulling: bool = False) -> JobRunInfo:
        request = self.request
        return JobRunInfo(
            attempt_id=request.attempt_id, job_id=request.job_id, number=request.number,
            state="pulling" if pulling and self.state == "starting" else self.state,
            container_id=self.container_id, exit_code=self.exit_code, error=self.error,
            started_at=self.started_at, finished_at=self.finished_at, progress=progress,
            collectable=self.collectable, log_bytes=self.log_bytes, gpu_device_ids=self.gpu_device_ids,
            image_pull=self.image_pull,
        )


class JobRunner:
    def __init__(self, settings: ControllerSettings, containers: ContainerService) -> None:
        self.settings = settings
        self.containers = containers
        self.runtime = containers.runtime
        self.models = containers.models
        self.root = settings.job_dir.absolute()
        self.tmp = self.root / ".tmp"
        self.runs: dict[str, _Run] = {}
        # The highest attempt number seen per job.
        self._numbers: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Started from the clock, so a restarted controller's versions pass those the hub saw before.
        self.version = int(time.time() * 1000)
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._pickup: asyncio.Task[None] | None = None
        # The progress files' modification times at the last look (long polls look every PROGRESS_CHECK s).
        self._marks: dict[str, int | None] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Pick up every attempt folder again, in the background (retried while Docker does not answer)."""
        if self._pickup is None:
            self._pickup = asyncio.create_task(self._pick_up_until_done())

    async def stop(self) -> None:
        """Stop watching (the containers go on; a restarted controller picks them up)."""
        tasks = [task for task in (self._pickup, *(run.task for run in self.runs.values())) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pickup = None

    async def ready(self, within: float = 10.0) -> None:
        """Return once the runs of before a restart are picked up again (DockerUnavailable after ``within`` s)."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), within)
        except TimeoutError:
            raise DockerUnavailable("this controller is still picking up its job runs (Docker does not answer); "
                                    "retry shortly") from None

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _lock(self, attempt_id: str) -> asyncio.Lock:
        return self._locks.setdefault(attempt_id, asyncio.Lock())

    def _get(self, attempt_id: str) -> _Run:
        run = self.runs.get(attempt_id)
        if run is None:
            raise JobRunNotFound(f"no job run {attempt_id!r} on this controller", {"attempt_id": attempt_id})
        return run

    # -- run ---------------------------------------------------------------

    async def run(self, request: JobRun) -> tuple[JobRunInfo, bool]:
        """The attempt's run, made and started now (True) or found (False: the same attempt_id ran before)."""
        _check_attempt_id(request.attempt_id)
        _input_paths([item.path for item in request.inputs])
        await self.ready()
        async with self._lock(request.attempt_id):
            run = self.runs.get(request.attempt_id)
            if run is not None:
                return await self._info(run), False
            seen = self._numbers.get(request.job_id)
            if seen is not None and request.number < seen:
                raise StaleEpoch(
                    f"attempt {request.number} of job {request.job_id} is older than attempt {seen} already seen",
                    {"job_id": request.job_id, "number": request.number, "current_number": seen})
            self.containers.sync.check()
            self._numbers[request.job_id] = request.number
            run = _Run(request, self.root / request.attempt_id)
            try:
                await asyncio.to_thread(self._make_dir, request)
            except OSError as exc:
                raise JobDirUnwritable(f"the job folder {self.root} cannot be written: {exc}",
                                       {"job_dir": str(self.root)}) from None
            self.runs[request.attempt_id] = run
            self._bump()
            try:
                created = await self._create(run)
            except BaseException:
                self.runs.pop(request.attempt_id, None)
                await asyncio.to_thread(shutil.rmtree, run.dir, True)
                self._bump()
                raise
            run.container_id = created.container_id
            run.gpu_device_ids = list(created.gpu_device_ids)
            run.image_pull = created.image_pull
            run.started_at = datetime.now(UTC)
            run.state = "running"
            self._bump()
            run.task = asyncio.create_task(self._watch(run))
            log.info("job %s attempt %s (%d) runs in container %s", request.job_id, request.attempt_id,
                     request.number, created.container_id[:12])
            return await self._info(run), True

    def _make_dir(self, request: JobRun) -> None:
        staging = self.tmp / f"{request.attempt_id}.{uuid.uuid4().hex}"
        for sub in ("outputs", "progress"):
            (staging / sub).mkdir(parents=True)
            # Writable whatever user the image runs as.
            os.chmod(staging / sub, 0o777)
        _write(staging / "request.json", request.model_dump_json(exclude={"registry_auth"}).encode())
        os.replace(staging, self.root / request.attempt_id)

    async def _create(self, run: _Run) -> ContainerCreated:
        request = run.request
        digests = list(dict.fromkeys(item.digest for item in request.inputs))
        mounts = [OwnMount(str(run.dir / "outputs"), OUTPUTS, read_only=False),
                  OwnMount(str(run.dir / "progress"), PROGRESS_DIR, read_only=False)]
        mounts += [OwnMount(str(self.models.path(item.digest)), f"{INPUTS}/{item.path}") for item in request.inputs]
        labels = {LABEL_JOB: request.job_id, LABEL_ATTEMPT: request.attempt_id, LABEL_EPOCH: str(request.number)}
        if digests:
            labels[LABEL_MODELS] = models_label(digests)
        environment = {
            **request.environment,
            "MMANAGER_JOB_ID": request.job_id,
            "MMANAGER_ATTEMPT": str(request.number),
            "MMANAGER_ATTEMPT_ID": request.attempt_id,
            "MMANAGER_PROGRESS_FILE": f"{PROGRESS_DIR}/{PROGRESS_FILE}",
        }
        config = ContainerCreate(
            image=request.image, command=request.command or None, environment=environment,
            memory_limit=request.memory_limit, cpu_limit=request.cpu_limit, restart_policy="no",
            epoch=request.number, gpu_count=request.gpu_count, gpu_device_ids=request.gpu_device_ids,
            gpu_memory=request.gpu_memory, registry_auth=request.registry_auth,
        )
        # The inputs stay pinned in the cache until the container that mounts them (and names them) exists.
        async with self.models.pinned(digests):
            if digests:
                await self.models.sync(digests)
            return await self.containers.create(config, JobParts(labels, tuple(mounts)))

    # -- watching ----------------------------------------------------------

    async def _watch(self, run: _Run) -> None:
        container_id = run.container_id
        assert container_id is not None
        stop_sent = False
        while True:
            try:
                remaining = self._remaining(run)
                if remaining is not None and remaining <= 0 and run.stopping is None:
                    await self._mark_stopping(run, "timed_out",
                                              f"ran past its timeout of {run.request.timeout:g} s and was stopped")
                if run.stopping is not None and not stop_sent:
                    await self.runtime.stop(container_id, STOP_GRACE)
                    stop_sent = True
                chunk = WAIT_CHUNK if remaining is None or run.stopping else min(max(remaining, 0.05), WAIT_CHUNK)
                if await self.runtime.wait(container_id, chunk) is not None:
                    break
            except NotFound:
                break
            except ControllerError as exc:
                log.warning("watching job run %s: %s; trying again", run.attempt_id, exc.message)
                await asyncio.sleep(RETRY_PAUSE)
        while True:
            try:
                await self._finish(run)
                return
            except ControllerError as exc:
                log.warning("collecting job run %s: %s; trying again", run.attempt_id, exc.message)
                await asyncio.sleep(RETRY_PAUSE)

    def _remaining(self, run: _Run) -> float | None:
        if run.request.timeout is None or run.started_at is None:
            return None
        deadline = run.started_at + timedelta(seconds=run.request.timeout)
        return (deadline - datetime.now(UTC)).total_seconds()

    async def _mark_stopping(self, run: _Run, state: JobRunState, error: str) -> None:
        marker = json.dumps({"state": state, "error": error}).encode()
        await asyncio.to_thread(_write, run.dir / "stop.json", marker)
        run.stopping, run.error = state, error
        self._bump()

    async def _finish(self, run: _Run, vanished: str | None = None) -> None:
        """Keep the ended container's log, outputs manifest and result, then remove it."""
        async with self._lock(run.attempt_id):
            if run.collectable or self.runs.get(run.attempt_id) is not run:
                return
            info: ContainerInfo | None = None
            if run.container_id is not None:
                with contextlib.suppress(NotFound):
                    info = await self.runtime.get_container(run.container_id)
            if info is not None and info.status in _LIVE:
                return  # not ended (a stop that failed): the watch goes on
            text = ""
            if info is not None:
                with contextlib.suppress(NotFound):
                    text = await self.runtime.logs(info.id, ALL_LINES)
                state = info.state or {}
                run.exit_code = _int(state.get("ExitCode"))
                run.started_at = _docker_time(state.get("StartedAt")) or run.started_at
                run.finished_at = _docker_time(state.get("FinishedAt"))
                if state.get("OOMKilled") and run.error is None:
                    run.error = "the job ran out of memory and was killed"
                run.state = run.stopping or "exited"
                if info.status == "created" and run.stopping is None:
                    # Made but never started: the controller stopped in between.
                    run.state, run.exit_code = "failed", None
                    run.error = "the job's container was made but never started"
            else:
                run.state = run.stopping or "failed"
                if run.stopping is None:
                    run.error = vanished or "the job's container vanished before it was collected"
            run.finished_at = run.finished_at or datetime.now(UTC)
            data = text.encode()
            run.log_bytes = len(data)
            await asyncio.to_thread(self._keep, run, data)
            if info is not None:
                try:
                    await self.runtime.remove(info.id, force=True)
                except NotFound:
                    pass
                except ControllerError as exc:
                    # Its result is on disk: the next pick-up removes it.
                    log.warning("could not remove the ended container of job run %s: %s", run.attempt_id, exc.message)
            run.collectable = True
            log.info("job run %s ended: %s (exit code %s)", run.attempt_id, run.state, run.exit_code)
            self._bump()

    def _keep(self, run: _Run, log_data: bytes) -> None:
        _write(run.dir / "log.txt", log_data)
        files = manifest(run.dir / "outputs")
        _write(run.dir / "outputs.json", JobOutputs(files=files, log_bytes=len(log_data)).model_dump_json().encode())
        # Last: its presence says the attempt ended and everything above is on disk.
        result = run.info().model_copy(update={"collectable": True})
        _write(run.dir / "result.json", result.model_dump_json(exclude={"progress", "image_pull"}).encode())

    # -- restart -----------------------------------------------------------

    async def _pick_up_until_done(self) -> None:
        while True:
            try:
                await self._pick_up()
                break
            except DockerUnavailable as exc:
                log.warning("cannot pick up job runs yet: %s; trying again", exc.message)
                await asyncio.sleep(RETRY_PAUSE)
        self._ready.set()

    async def _pick_up(self) -> None:
        found = await asyncio.to_thread(self._scan)
        containers = await self.runtime.list_containers(all=True, detailed=False)
        by_attempt = {c.attempt_id: c for c in containers if c.attempt_id}
        for run, result, marker in found:
            if run.attempt_id in self.runs:
                continue
            request = run.request
            self._numbers[request.job_id] = max(request.number, self._numbers.get(request.job_id, 0))
            self.runs[run.attempt_id] = run
            container = by_attempt.get(run.attempt_id)
            if result is not None:
                _restore(run, result)
                if container is not None:
                    with contextlib.suppress(NotFound):
                        await self.runtime.remove(container.id, force=True)
                continue
            if marker is not None:
                run.stopping, run.error = marker
            if container is None:
                await self._finish(run, "the job's container vanished while the controller was down")
                continue
            detail = await self.runtime.get_container(container.id)
            run.container_id = detail.id
            run.gpu_device_ids = list(detail.gpu_device_ids)
            run.started_at = _docker_time((detail.state or {}).get("StartedAt"))
            run.state = "running"
            run.task = asyncio.create_task(self._watch(run))
            log.info("picked up job run %s again (container %s)", run.attempt_id, detail.id[:12])
        self._bump()

    def _scan(self) -> list[tuple[_Run, JobRunInfo | None, tuple[JobRunState, str] | None]]:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.root.is_dir():
            return []  # made with the first run
        found = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False) or not _ATTEMPT_RE.match(entry.name):
                continue
            folder = Path(entry.path)
            try:
                request = JobRun.model_validate_json((folder / "request.json").read_bytes())
                result = (JobRunInfo.model_validate_json((folder / "result.json").read_bytes())
                          if (folder / "result.json").exists() else None)
                marker = None
                if (folder / "stop.json").exists():
                    stopped = json.loads((folder / "stop.json").read_bytes())
                    marker = (cast(JobRunState, stopped["state"]), str(stopped["error"]))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("job folder %s cannot be read (%s); left as it is", folder, exc)
                continue
            found.append((_Run(request, folder), result, marker))
        return found

    # -- reads -------------------------------------------------------------

    async def _info(self, run: _Run) -> JobRunInfo:
        return (await self._infos([run]))[0]

    async def _infos(self, runs: list[_Run]) -> list[JobRunInfo]:
        pulls = {pull.image for pull in self.runtime.pull_progress()}

        def read() -> list[JobRunInfo]:
            return [run.info(read_progress(run.dir / "progress" / PROGRESS_FILE), run.request.image.strip() in pulls)
                    for run in runs]

        return await asyncio.to_thread(read)

    async def get(self, attempt_id: str) -> JobRunInfo:
        return await self._info(self._get(attempt_id))

    async def list(self, since: int | None = None, wait: float = 0) -> JobRunList:
        """Every run; with ``since`` equal to the current version and a ``wait``, once it moves (or after it)."""
        if since is not None and since == self.version and wait > 0:
            deadline = time.monotonic() + wait
            while since == self.version and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, PROGRESS_CHECK))
                await self._progress_moved()
        # What this answer shows: a later rewrite of a progress file is a change for the next long poll.
        self._marks = await self._progress_marks()
        version = self.version
        return JobRunList(version=version, runs=await self._infos(list(self.runs.values())))

    async def _progress_marks(self) -> dict[str, int | None]:
        runs = [run for run in self.runs.values() if not run.collectable]
        return await asyncio.to_thread(lambda: {run.attempt_id: _mtime(run.dir / "progress" / PROGRESS_FILE)
                                                for run in runs})

    async def _progress_moved(self) -> None:
        """A job rewrote its progress file since the last answer: a change (the version goes up)."""
        marks = await self._progress_marks()
        if any(self._marks.get(attempt) != mark for attempt, mark in marks.items()):
            self._marks = marks
            self._bump()

    async def outputs(self, attempt_id: str) -> JobOutputs:
        run = self._ended(attempt_id)
        return await asyncio.to_thread(lambda: JobOutputs.model_validate_json((run.dir / "outputs.json").read_bytes()))

    async def output_file(self, attempt_id: str, path: str) -> Path:
        """The host path of one file of the attempt's manifest."""
        _relative(path, "output path")
        run = self._ended(attempt_id)
        listed = await self.outputs(attempt_id)
        if path not in {item.path for item in listed.files}:
            raise NotFound(f"job run {attempt_id} left no output file {path!r}", {"path": path})
        return run.dir / "outputs" / path

    def _ended(self, attempt_id: str) -> _Run:
        run = self._get(attempt_id)
        if not run.collectable:
            raise JobRunning(f"job run {attempt_id} has not ended yet ({run.state})",
                             {"attempt_id": attempt_id, "state": run.state})
        return run

    def log_file(self, attempt_id: str) -> Path | None:
        """The kept log of an ended run; None while it runs (Docker has it)."""
        run = self._get(attempt_id)
        return run.dir / "log.txt" if run.collectable else None

    def container_of(self, attempt_id: str) -> str | None:
        return self._get(attempt_id).container_id

    def attempt_of(self, container_id: str) -> str | None:
        return next((run.attempt_id for run in self.runs.values() if run.container_id == container_id), None)

    # -- cancel and delete -------------------------------------------------

    async def cancel(self, attempt_id: str) -> JobRunInfo:
        """Stop its container; it ends ``cancelled``, its outputs and log kept to collect."""
        run = self._get(attempt_id)
        if run.collectable or run.state in JOB_RUN_ENDED or run.stopping is not None:
            return await self._info(run)
        await self._mark_stopping(run, "cancelled", "cancelled")
        if run.container_id is not None:
            with contextlib.suppress(NotFound):
                await self.runtime.stop(run.container_id, STOP_GRACE)
            await self._finish(run)
        # Still being made: its watch stops it as soon as it exists.
        return await self._info(run)

    async def delete(self, attempt_id: str) -> None:
        """Remove its container (running or not) and everything kept of it."""
        async with self._lock(attempt_id):
            await self._drop(self._get(attempt_id))

    async def discard(self, attempt_id: str) -> bool:
        """A stale attempt the hub no longer wants: dropped like ``delete``; False when there is none."""
        await self.ready()
        if attempt_id not in self.runs:
            return False
        async with self._lock(attempt_id):
            run = self.runs.get(attempt_id)
            if run is not None:
                run.stopping, run.state = "cancelled", "cancelled"
                await self._drop(run)
        return True

    async def _drop(self, run: _Run) -> None:
        if run.task is not None:
            run.task.cancel()  # not awaited: it may wait for this very lock
        if run.container_id is not None and not run.collectable:
            with contextlib.suppress(NotFound):
                await self.runtime.remove(run.container_id, force=True)
        await asyncio.to_thread(shutil.rmtree, run.dir, True)
        self.runs.pop(run.attempt_id, None)
        self._locks.pop(run.attempt_id, None)
        log.info("job run %s dropped: container and files removed", run.attempt_id)
        self._bump()


# -- files ---------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def manifest(outputs: Path) -> list[JobOutputFile]:
    """Every regular file under ``outputs`` with its size and sha256, by '/'-separated relative path; symlinks
    and special files are neither followed nor listed."""
    files = []
    for folder, dirs, names in os.walk(outputs, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            relative = os.path.relpath(full, outputs).replace(os.sep, "/")
            try:
                relative.encode()
            except UnicodeEncodeError:
                log.warning("output file %r is not named in UTF-8; not listed", relative)
                continue
            files.append(JobOutputFile(path=relative, size=st.st_size, sha256=_sha256(full)))
    return sorted(files, key=lambda item: item.path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    # O_NOFOLLOW: a file swapped for a link since it was listed is not read through.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def read_progress(path: Path) -> JobProgress | None:
    """The job's last progress; None when there is none, or it is malformed or half-written."""
    try:
        with open(path, "rb") as source:
            data = source.read(MAX_PROGRESS_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_PROGRESS_BYTES:
        return None
    try:
        return JobProgress.model_validate_json(data)
    except ValidationError:
        return None


def _restore(run: _Run, result: JobRunInfo) -> None:
    run.state, run.container_id, run.exit_code, run.error = result.state, result.container_id, result.exit_code, result.error
    run.started_at, run.finished_at, run.log_bytes = result.started_at, result.finished_at, result.log_bytes
    run.gpu_device_ids, run.collectable = list(result.gpu_device_ids), True


# -- checks --------------------------------------------------------------------


def _check_attempt_id(attempt_id: str) -> None:
    if not _ATTEMPT_RE.match(attempt_id):
        raise InvalidPath("attempt_id must be letters, digits, '_', '.' or '-', starting with a letter or digit",
                          {"attempt_id": attempt_id})


def _relative(path: str, what: str) -> list[str]:
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise InvalidPath(f"{what} {path!r} must be relative, without '..', '.' or empty segments", {"path": path})
    return parts


def _input_paths(paths: list[str]) -> None:
    """Each input's path is relative and clean, and none is another's, or inside another's (a file)."""
    seen = set()
    for path in paths:
        _relative(path, "input path")
        if path in seen:
            raise InvalidPath(f"two inputs are mounted at {path!r}", {"path": path})
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in seen:
                raise InvalidPath(f"input path {path!r} is inside another input's file", {"path": path})


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _docker_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
