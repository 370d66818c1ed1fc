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
from weakref import WeakValueDictionary

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
# The most output files, and bytes in all, an attempt may leave: past either its outputs are not collected
# (it fails, saying why), so neither the controller's hashing nor the hub's collection runs without end.
MAX_OUTPUT_FILES = 10_000
MAX_OUTPUT_BYTES = 64 * 1024**3
# In the job folder: the highest attempt number seen per job, one small file each (named by the job id's
# sha256), so a restarted controller still refuses an attempt that ran and was deleted.
NUMBERS_DIR = ".numbers"


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
    # The kept manifest by path, read once from ``outputs.json``.
    outputs: dict[str, JobOutputFile] | None = None

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
        # Entries vanish once no call holds or awaits them.
        self._locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        # Started from the clock, so a restarted controller's versions pass those the hub saw before.
        self.version = int(time.time() * 1000)
        self._changed = asyncio.Event()
        # Set once the server begins to shut down: long polls answer at once instead of holding it up.
        self._closing = False
        self._ready = asyncio.Event()
        self._pickup: asyncio.Task[None] | None = None
        # The progress files' marks when the version last went up for them: a later rewrite is a change,
        # whoever reads the list in between.
        self._marks: dict[str, tuple[int, int, int] | None] = {}

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

    def closing(self) -> None:
        """The server is shutting down: every long poll answers now, and later ones do not wait."""
        self._closing = True
        self._changed.set()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _lock(self, attempt_id: str) -> asyncio.Lock:
        lock = self._locks.get(attempt_id)
        if lock is None:
            lock = self._locks[attempt_id] = asyncio.Lock()
        return lock

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
            self.containers.sync.check()
            run = _Run(request, self.root / request.attempt_id)
            async with self._lock(_job_key(request.job_id)):
                try:
                    seen = await asyncio.to_thread(self._seen_number, request.job_id)
                except OSError as exc:
                    raise JobDirUnwritable(f"the job folder {self.root} cannot be read: {exc}",
                                           {"job_dir": str(self.root)}) from None
                # An unknown attempt with a number already seen ran here before and was deleted (or is another
                # copy of a number that ran): never run again.
                if seen is not None and request.number <= seen:
                    raise StaleEpoch(
                        f"attempt {request.number} of job {request.job_id} is not newer than attempt {seen} "
                        "already seen",
                        {"job_id": request.job_id, "number": request.number, "current_number": seen})
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
                if await self._no_container(request.attempt_id):
                    # Nothing ran: as if it was never asked (the number too, unless a newer one came meanwhile).
                    async with self._lock(_job_key(request.job_id)):
                        await asyncio.to_thread(self._unsee_number, request.job_id, request.number, seen)
                    await asyncio.to_thread(shutil.rmtree, run.dir, True)
                else:
                    # A container made for it may be left (its discard failed): the folder it binds stays, and
                    # the hub's stale-attempt order (or a restart's pick-up) deals with both.
                    log.warning("job run %s failed to start and a container of it may remain; its folder is kept",
                                request.attempt_id)
                self._bump()
                raise
            with contextlib.suppress(OSError):
                # Says a container was made: after a restart, one missing vanished (rather than never started).
                await asyncio.to_thread(_write, run.dir / "container.json",
                                        json.dumps({"container_id": created.container_id}).encode())
            run.container_id = created.container_id
            run.gpu_device_ids = list(created.gpu_device_ids)
            run.image_pull = created.image_pull
            run.started_at = datetime.now(UTC)
            run.state = "running"
            self._bump()
            run.task = self._watch_task(run)
            log.info("job %s attempt %s (%d) runs in container %s", request.job_id, request.attempt_id,
                     request.number, created.container_id[:12])
            return await self._info(run), True

    async def _no_container(self, attempt_id: str) -> bool:
        """No container of this attempt exists (False when Docker cannot tell)."""
        try:
            listed = await self.runtime.list_containers(all=True, labels={LABEL_ATTEMPT: attempt_id}, detailed=False)
        except Exception:  # noqa: BLE001 - unknown is "may exist"
            return False
        return not any(c.attempt_id == attempt_id for c in listed)

    def _own_root(self) -> None:
        """The job folder, made private: the folders bound into jobs are writable by any user, and a job may
        leave anything in them, so no host user but this controller's may reach inside."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _number_file(self, job_id: str) -> Path:
        return self.root / NUMBERS_DIR / hashlib.sha256(job_id.encode()).hexdigest()

    def _seen_number(self, job_id: str) -> int | None:
        try:
            return int(self._number_file(job_id).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def _see_number(self, job_id: str, number: int) -> None:
        """Keep ``number`` as the job's highest seen (never lowers it)."""
        seen = self._seen_number(job_id)
        if seen is not None and seen >= number:
            return
        path = self._number_file(job_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _write(path, str(number).encode())

    def _unsee_number(self, job_id: str, number: int, previous: int | None) -> None:
        with contextlib.suppress(OSError):
            if self._seen_number(job_id) != number:
                return
            if previous is None:
                self._number_file(job_id).unlink()
            else:
                _write(self._number_file(job_id), str(previous).encode())

    def _make_dir(self, request: JobRun) -> None:
        self._own_root()
        self._see_number(request.job_id, request.number)
        staging = self.tmp / f"{request.attempt_id}.{uuid.uuid4().hex}"
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        staging.mkdir(mode=0o700)
        for sub in ("outputs", "progress"):
            (staging / sub).mkdir()
            # Writable whatever user the image runs as; reached only through the private folders above.
            os.chmod(staging / sub, 0o777)
        _write(staging / "request.json", request.model_dump_json(exclude={"registry_auth"}).encode())
        os.replace(staging, self.root / request.attempt_id)
        _sync_dir(self.root)

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

    def _watch_task(self, run: _Run) -> asyncio.Task[None]:
        task = asyncio.create_task(self._watch(run))
        task.add_done_callback(lambda done: _log_failure(done, f"watching job run {run.attempt_id}"))
        return task

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
            except OSError as exc:
                log.warning("watching job run %s: %s; trying again", run.attempt_id, exc)
                await asyncio.sleep(RETRY_PAUSE)
        while True:
            try:
                await self._finish(run)
                return
            except ControllerError as exc:
                log.warning("collecting job run %s: %s; trying again", run.attempt_id, exc.message)
            except OSError as exc:
                # A full disk, say: the run stays unended (and its container kept) until its files are written.
                log.warning("keeping what job run %s left: %s; trying again", run.attempt_id, exc)
            await asyncio.sleep(RETRY_PAUSE)

    def _remaining(self, run: _Run) -> float | None:
        if run.request.timeout is None or run.started_at is None:
            return None
        deadline = run.started_at + timedelta(seconds=run.request.timeout)
        return (deadline - datetime.now(UTC)).total_seconds()

    def _current(self, run: _Run) -> bool:
        """Still this controller's run and not ended (not dropped, nor collected, meanwhile)."""
        return self.runs.get(run.attempt_id) is run and not run.collectable

    async def _mark_stopping(self, run: _Run, state: JobRunState, error: str) -> None:
        """Under the attempt's lock: the run is still current and not already stopping."""
        async with self._lock(run.attempt_id):
            if not self._current(run) or run.stopping is not None:
                return
            marker = json.dumps({"state": state, "error": error}).encode()
            await asyncio.to_thread(_write, run.dir / "stop.json", marker)
            run.stopping, run.error = state, error
            self._bump()

    async def _finish(self, run: _Run, vanished: str | None = None) -> None:
        """Keep the ended container's log, outputs manifest and result, then remove it. The run takes its final
        state only once all of it is on disk."""
        async with self._lock(run.attempt_id):
            if self.runs.get(run.attempt_id) is not run or run.collectable:
                return  # dropped or finished meanwhile
            info: ContainerInfo | None = None
            if run.container_id is not None:
                with contextlib.suppress(NotFound):
                    info = await self.runtime.get_container(run.container_id)
            if info is not None and info.status in _LIVE:
                return  # not ended (a stop that failed): the watch goes on
            data = b""
            final: dict[str, Any] = {"state": run.stopping or "failed", "exit_code": run.exit_code, "error": run.error,
                                     "started_at": run.started_at, "finished_at": run.finished_at}
            if info is not None:
                with contextlib.suppress(NotFound):
                    data = await self.runtime.log_bytes(info.id, ALL_LINES)
                state = info.state or {}
                final["exit_code"] = _int(state.get("ExitCode"))
                final["started_at"] = _docker_time(state.get("StartedAt")) or run.started_at
                final["finished_at"] = _docker_time(state.get("FinishedAt"))
                if state.get("OOMKilled") and final["error"] is None:
                    final["error"] = "the job ran out of memory and was killed"
                final["state"] = run.stopping or "exited"
                if info.status == "created" and run.stopping is None:
                    # Made but never started: the controller stopped in between.
                    final["state"], final["exit_code"] = "failed", None
                    final["error"] = "the job's container was made but never started"
            elif run.stopping is None:
                final["error"] = vanished or "the job's container vanished before it was collected"
            final["finished_at"] = final["finished_at"] or datetime.now(UTC)
            final["log_bytes"] = len(data)
            outputs = await asyncio.to_thread(self._keep, run, data, final)
            if info is not None:
                try:
                    await self.runtime.remove(info.id, force=True)
                except NotFound:
                    pass
                except ControllerError as exc:
                    # Its result is on disk: the next pick-up removes it.
                    log.warning("could not remove the ended container of job run %s: %s", run.attempt_id, exc.message)
            if final["state"] == "exited" and final["exit_code"] == 0:
                # A next step placed here (the hub prefers the controller that made a job's inputs) mounts
                # them from the model cache instead of fetching back from the hub what this server made.
                for item in outputs.values():
                    await self.models.keep(f"sha256:{item.sha256}", run.dir / "outputs" / item.path, item.size)
            for key, value in final.items():
                setattr(run, key, value)
            run.outputs = outputs
            run.collectable = True
            log.info("job run %s ended: %s (exit code %s)", run.attempt_id, run.state, run.exit_code)
            self._bump()

    def _keep(self, run: _Run, log_data: bytes, final: dict[str, Any]) -> dict[str, JobOutputFile]:
        """Write the log, the manifest and the result; ``final`` gets the error of outputs over the limits."""
        _write(run.dir / "log.txt", log_data)
        try:
            files = manifest(run.dir / "outputs")
        except OutputsTooLarge as exc:
            files = []
            final["state"] = "failed"
            final["error"] = f"{exc}; no output was collected" + (f" ({final['error']})" if final["error"] else "")
        _write(run.dir / "outputs.json", JobOutputs(files=files, log_bytes=len(log_data)).model_dump_json().encode())
        # Last: its presence says the attempt ended and everything above is on disk.
        result = run.info().model_copy(update={**final, "collectable": True})
        _write(run.dir / "result.json", result.model_dump_json(exclude={"progress", "image_pull"}).encode())
        return {item.path: item for item in files}

    # -- restart -----------------------------------------------------------

    async def _pick_up_until_done(self) -> None:
        while True:
            try:
                await self._pick_up()
                break
            except DockerUnavailable as exc:
                log.warning("cannot pick up job runs yet: %s; trying again", exc.message)
            except Exception:  # noqa: BLE001 - whatever it was, the jobs API must not stay unready until a restart
                log.exception("picking up job runs failed; trying again")
            await asyncio.sleep(RETRY_PAUSE)
        self._ready.set()

    async def _pick_up(self) -> None:
        """Each folder's run again (one in ``runs`` was picked up by an earlier try: not again)."""
        found = await asyncio.to_thread(self._scan)
        containers = await self.runtime.list_containers(all=True, detailed=False)
        by_attempt = {c.attempt_id: c for c in containers if c.attempt_id}
        for run, result, marker, made in found:
            if run.attempt_id in self.runs:
                continue
            request = run.request
            await asyncio.to_thread(self._see_number, request.job_id, request.number)
            container = by_attempt.get(run.attempt_id)
            if result is not None:
                _restore(run, result)
                if container is not None:
                    with contextlib.suppress(NotFound):
                        await self.runtime.remove(container.id, force=True)
                self.runs[run.attempt_id] = run
                continue
            if marker is not None:
                run.stopping, run.error = marker
            detail = None
            if container is not None:
                with contextlib.suppress(NotFound):
                    detail = await self.runtime.get_container(container.id)
            unstarted = detail is not None and detail.status == "created" and marker is None
            if (detail is None and not made) or unstarted:
                # The controller stopped before its container was made (during the pull, say) or started: nothing
                # ran. Dropped, so the hub finds the attempt missing and places the job again without counting
                # a retry.
                if detail is not None:
                    with contextlib.suppress(NotFound):
                        await self.runtime.remove(detail.id, force=True)
                await asyncio.to_thread(shutil.rmtree, run.dir, True)
                log.info("job run %s never got a container before the controller stopped; dropped", run.attempt_id)
                continue
            self.runs[run.attempt_id] = run
            if detail is None:
                await self._finish(run, "the job's container vanished while the controller was down")
                continue
            run.container_id = detail.id
            run.gpu_device_ids = list(detail.gpu_device_ids)
            run.started_at = _docker_time((detail.state or {}).get("StartedAt"))
            run.state = "running"
            run.task = self._watch_task(run)
            log.info("picked up job run %s again (container %s)", run.attempt_id, detail.id[:12])
        self._bump()

    def _scan(self) -> list[tuple[_Run, JobRunInfo | None, tuple[JobRunState, str] | None, bool]]:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.root.is_dir():
            return []  # made with the first run
        self._own_root()
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
            found.append((_Run(request, folder), result, marker, (folder / "container.json").exists()))
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
            while not self._closing and since == self.version and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, PROGRESS_CHECK))
                await self._progress_moved()
        else:
            # What this answer shows is under its version: a rewrite seen now goes up first.
            await self._progress_moved()
        version = self.version
        return JobRunList(version=version, runs=await self._infos(list(self.runs.values())))

    async def _progress_marks(self) -> dict[str, tuple[int, int, int] | None]:
        runs = [run for run in self.runs.values() if not run.collectable]
        return await asyncio.to_thread(lambda: {run.attempt_id: _mark(run.dir / "progress" / PROGRESS_FILE)
                                                for run in runs})

    async def _progress_moved(self) -> None:
        """A job rewrote its progress file since the version last went up for one: a change. The marks change only
        here, with the version, so no reader hides a rewrite from another."""
        marks = await self._progress_marks()
        if any(self._marks.get(attempt) != mark for attempt, mark in marks.items()):
            self._marks = marks
            self._bump()

    async def outputs(self, attempt_id: str) -> JobOutputs:
        run = self._ended(attempt_id)
        files = await self._manifest(run)
        return JobOutputs(files=sorted(files.values(), key=lambda item: item.path), log_bytes=run.log_bytes)

    async def _manifest(self, run: _Run) -> dict[str, JobOutputFile]:
        if run.outputs is None:
            kept = await asyncio.to_thread(lambda: JobOutputs.model_validate_json((run.dir / "outputs.json").read_bytes()))
            run.outputs = {item.path: item for item in kept.files}
        return run.outputs

    async def output_file(self, attempt_id: str, path: str) -> Path:
        """The host path of one file of the attempt's manifest."""
        _relative(path, "output path")
        run = self._ended(attempt_id)
        if path not in await self._manifest(run):
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
        # Under its lock: not a run dropped or collected since it was looked up.
        await self._mark_stopping(run, "cancelled", "cancelled")
        run = self._get(attempt_id)
        if run.collectable or run.state in JOB_RUN_ENDED or run.stopping != "cancelled":
            return await self._info(run)
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
            # A folder left by a start that failed with its container (see ``run``) goes with it.
            if _ATTEMPT_RE.match(attempt_id):
                await asyncio.to_thread(shutil.rmtree, self.root / attempt_id, True)
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
        log.info("job run %s dropped: container and files removed", run.attempt_id)
        self._bump()


# -- files ---------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all (a temporary file renamed over it, the rename itself made
    durable), readable by this controller's user only."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log_failure(task: asyncio.Task[None], what: str) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed: %s", what, exc, exc_info=exc)


class OutputsTooLarge(Exception):
    """An attempt left more output files, or bytes, than are collected."""


def manifest(outputs: Path) -> list[JobOutputFile]:
    """Every regular file under ``outputs`` with its size and sha256, by '/'-separated relative path; symlinks
    and special files are neither followed nor listed. More than ``MAX_OUTPUT_FILES`` files or
    ``MAX_OUTPUT_BYTES`` bytes: OutputsTooLarge (counted before any is hashed)."""
    found = []
    total = 0
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
            found.append((relative, full, st.st_size))
            total += st.st_size
            if len(found) > MAX_OUTPUT_FILES:
                raise OutputsTooLarge(f"the job left more than {MAX_OUTPUT_FILES} output files")
            if total > MAX_OUTPUT_BYTES:
                raise OutputsTooLarge(f"the job left more than {MAX_OUTPUT_BYTES} bytes of output files")
    files = [JobOutputFile(path=relative, size=size, sha256=_sha256(full)) for relative, full, size in found]
    return sorted(files, key=lambda item: item.path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    # O_NOFOLLOW: a file swapped for a link since it was listed is not read through.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mark(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten (a rename over it makes a new inode, whatever the clock says)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def read_progress(path: Path) -> JobProgress | None:
    """The job's last progress; None when there is none, or it is malformed, half-written, not finite, or not a
    regular file. The job owns the folder: a FIFO there must not block this thread, nor a symlink be followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = b""
        while len(data) <= MAX_PROGRESS_BYTES and (chunk := os.read(fd, MAX_PROGRESS_BYTES + 1 - len(data))):
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
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
    run.outputs = None


# -- checks --------------------------------------------------------------------


def _job_key(job_id: str) -> str:
    """The lock of a job's attempt numbers (never an attempt id: those have no space)."""
    return f"job {job_id}"


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
