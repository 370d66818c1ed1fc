"""The rules of the container lifecycle on this host.

Every state change of a managed container goes through ``ContainerService``:
it is the only caller of the runtime's create, start, stop, restart, remove
and copy methods. Its invariants:

- A create carrying a ``service_id`` is idempotent on ``(service_id, epoch)``:
  repeating it returns the container made the first time (started if it had
  stopped), never a second one. A per-service lock makes concurrent
  duplicates safe.
- Epoch fencing: the highest epoch seen per service is remembered (seeded
  from the containers' labels, so a restart forgets nothing that matters);
  creating, starting or restarting with an older epoch, or starting a
  container whose own epoch is older (when the caller names no epoch of its
  own), answers 409 STALE_EPOCH.
- Admission (capacity and GPU choice) happens under one lock together with
  the Docker create, so two creates can never both take the last slot or
  the same GPU.
- A create that fails leaves no container behind.
- A job's container (``controller.jobs``) is made by the same create, with ``JobParts``: idempotent on
  its attempt, never labelled ``mmanager.service``.
- With heartbeats on, create, start and restart are refused (503
  CONTROLLER_NOT_SYNCED) until a heartbeat round trip has removed the stale
  copies the hub named (``controller.sync``). Stop and remove never are: that
  is how stale copies go away. ``heal`` (the prober's in-place restart of an
  unhealthy container) is not new work and is not refused either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from weakref import WeakValueDictionary

from controller import archives, copies
from controller.config import ControllerSettings
from controller.errors import (
    CapacityExceeded,
    ContainerNotRunning,
    ControllerError,
    CopyFailed,
    DockerUnavailable,
    ImageNotFound,
    ImageNotPresent,
    InvalidRequest,
    StaleEpoch,
    StartFailed,
)
from controller.gpu import (
    LABEL_GPU_MEMORY,
    LABEL_GPUS,
    choose_gpus,
    choose_shared_gpu,
    gpu_shares,
    gpus_in_use,
    share_environment,
)
from controller.model_cache import LABEL_MODELS, ModelCache, models_label
from controller.runtime import Runtime
from controller.schemas import CopyResult, DirectoryCopy, FileCopy
from controller.spec import JOB_CAP_DROP, ContainerSpec, OwnMount, build_spec
from controller.sync import SyncGuard
from mmanager.wire import (
    LABEL_ATTEMPT,
    LABEL_SERVICE,
    ActionResult,
    ContainerCreate,
    ContainerCreated,
    ContainerInfo,
    GpuInfo,
    ImagePulled,
    parse_memory,
)

# States in which a container needs no start to be serving (or about to).
_LIVE = frozenset({"running", "restarting", "paused"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobParts:
    """What a job's container gets beyond its create request (``controller.jobs``): its labels (``mmanager.job``,
    ``mmanager.attempt``, ``mmanager.models``), set past the policy's refusal of reserved ``mmanager.*`` labels,
    and the folders and files this controller made for it, bound as listed."""

    labels: dict[str, str]
    mounts: tuple[OwnMount, ...] = ()

    @property
    def attempt_id(self) -> str:
        return self.labels[LABEL_ATTEMPT]


class ContainerService:
    def __init__(
        self, settings: ControllerSettings, runtime: Runtime, gpus: list[GpuInfo], sync: SyncGuard | None = None,
        models: ModelCache | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.models = models or ModelCache(settings, runtime)
        self.gpus = gpus
        self.sync = sync or SyncGuard(required=False)
        self._epochs: dict[str, int] = {}
        self._seeded = False
        self._seed_lock = asyncio.Lock()
        self._admission = asyncio.Lock()
        # Entries vanish once no request holds or awaits them.
        self._service_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()

    # -- epochs ------------------------------------------------------------

    async def seed_epochs(self) -> None:
        """Learn the highest epoch per service from the containers' labels, once."""
        async with self._seed_lock:
            if self._seeded:
                return
            for container in await self.runtime.list_containers(all=True, detailed=False):
                if container.service_id and container.epoch is not None:
                    self._record(container.service_id, container.epoch)
            self._seeded = True

    def _record(self, service_id: str, epoch: int) -> None:
        self._epochs[service_id] = max(epoch, self._epochs.get(service_id, epoch))

    def _fence(self, service_id: str, epoch: int) -> None:
        current = self._epochs.get(service_id)
        if current is not None and epoch < current:
            raise StaleEpoch(
                f"epoch {epoch} of service {service_id} is older than epoch {current} already seen",
                {"service_id": service_id, "epoch": epoch, "current_epoch": current},
            )
        self._record(service_id, epoch)

    def _lock(self, service_id: str | None) -> AbstractAsyncContextManager[object]:
        if not service_id:
            return contextlib.nullcontext()
        lock = self._service_locks.get(service_id)
        if lock is None:
            lock = self._service_locks[service_id] = asyncio.Lock()
        return lock

    # -- create ------------------------------------------------------------

    async def create(self, config: ContainerCreate, job: JobParts | None = None) -> ContainerCreated:
        """Three Docker round trips for a new container: one listing, the create, the start (with the
        inspect that reads its outcome on the same pool thread). The listing serves both the idempotency
        lookup and the admission count; a missing image is the create's own refusal (ImageNotPresent),
        and only then is it pulled, outside the admission lock (other services' creates go on meanwhile,
        this service's wait on its lock), and the admission made again."""
        settings = self.settings
        spec = build_spec(
            config,
            server_id=settings.server_id,
            publish_ip=settings.publish_ip,
            policy=settings.spec_policy,
            pids_limit=settings.pids_limit,
            default_memory=parse_memory(settings.default_memory_limit),
        )
        if job is not None:
            labels = {key: value for key, value in spec.labels.items() if key != LABEL_SERVICE}
            spec = replace(spec, labels={**labels, **job.labels}, own_mounts=(*spec.own_mounts, *job.mounts),
                           cap_drop=JOB_CAP_DROP)
        self.sync.check()
        if config.service_id:
            await self.seed_epochs()
        digests = [model.digest for model in config.models]
        # The service's lock spans the start too: a concurrent duplicate waits and then finds the container.
        # Its model files stay pinned (never evicted) until the container that mounts them exists.
        pins = self.models.pinned(digests) if digests else contextlib.nullcontext()
        async with self._lock(config.service_id), pins:
            if config.service_id:
                self._fence(config.service_id, config.epoch or 0)
            if config.models:
                binds = self._model_binds(config)
                # Fetched and checked before anything is made: a sync that fails leaves no container.
                await self.models.sync(digests)
                spec = replace(spec, volumes={**spec.volumes, **binds},
                               labels={**spec.labels, LABEL_MODELS: models_label(digests)})
            container_id: str | None = None
            pulled: ImagePulled | None = None
            for again in (False, True):
                async with self._admission:
                    managed = await self.runtime.list_containers(all=True, detailed=False)
                    existing = _same_create(managed, config, job)
                    if existing is None:
                        try:
                            container_id = await self._admit(config, spec, managed)
                        except ImageNotPresent as exc:
                            if again:
                                # Gone again between the pull and the create (a prune).
                                raise ImageNotFound(exc.message, exc.details) from None
                            container_id = None
                if container_id is not None or existing is not None:
                    break
                auth = config.registry_auth.docker_auth() if config.registry_auth is not None else None
                pulled = await self.runtime.pull_missing(spec.image, auth)
                if config.service_id:
                    # A pull takes long: a newer epoch may have been seen meanwhile.
                    self._fence(config.service_id, config.epoch or 0)
            if existing is not None:
                return await self._reuse(existing)
            assert container_id is not None
            return await self._start_new(container_id, pulled)

    def _model_binds(self, config: ContainerCreate) -> dict[str, dict[str, str]]:
        """The cached files bound read-only at their mounts."""
        binds = {}
        for model in config.models:
            mount = model.mount
            if not posixpath.isabs(mount) or ".." in mount.split("/") or mount.endswith("/"):
                raise InvalidRequest(f"model {model.digest}: mount {mount!r} must be an absolute file path")
            binds[str(self.models.path(model.digest))] = {"bind": mount, "mode": "ro"}
        return binds

    async def _reuse(self, container: ContainerInfo) -> ContainerCreated:
        if container.status in _LIVE:
            return _created(await self.runtime.get_container(container.id), created=False)
        try:
            info = await self.runtime.start_created(container.id)
        except DockerUnavailable:
            raise
        except ControllerError as exc:
            raise StartFailed(f"existing container would not start: {exc.message}", exc.details) from None
        if info is None:
            raise StartFailed("existing container exited at once and was removed (auto_remove)")
        return _created(info, created=False)

    async def _admit(self, config: ContainerCreate, spec: ContainerSpec, managed: list[ContainerInfo]) -> str:
        """Capacity, GPU choice and the Docker create, under the admission lock (``managed`` listed under it)."""
        limit = self.settings.max_containers
        if len(managed) >= limit:
            raise CapacityExceeded(
                f"this controller already manages {len(managed)} of at most {limit} containers",
                {"managed": len(managed), "max_containers": limit},
            )
        if config.gpu_memory:
            # A share of one GPU: the label records it (a restarted controller sees it), the environment says it.
            whole, shared = gpu_shares(managed)
            index = choose_shared_gpu(self.gpus, whole, shared, config.gpu_memory, config.gpu_device_ids)
            spec = replace(spec, gpu_device_ids=[index],
                           environment={**spec.environment, **share_environment(config.gpu_memory)},
                           labels={**spec.labels, LABEL_GPUS: index, LABEL_GPU_MEMORY: str(config.gpu_memory)})
        elif config.gpu_count or config.gpu_device_ids:
            gpus = choose_gpus(self.gpus, gpus_in_use(managed), config.gpu_count, config.gpu_device_ids)
            spec = replace(spec, gpu_device_ids=gpus, labels={**spec.labels, LABEL_GPUS: ",".join(gpus)})
        # No image check first: Docker's create refuses a missing image itself (ImageNotPresent).
        return await self.runtime.create_container(spec)

    async def _start_new(self, container_id: str, pulled: ImagePulled | None = None) -> ContainerCreated:
        try:
            info = await self.runtime.start_created(container_id)
        except ControllerError as exc:
            removed = await self._discard(container_id)
            if isinstance(exc, DockerUnavailable):
                raise
            what = "was removed" if removed else "could not be removed"
            raise StartFailed(f"container would not start and {what}: {exc.message}", exc.details) from None
        if info is None:
            raise StartFailed("container exited at once and was removed (auto_remove)")
        log.info(
            "created container %s (%s) for service %s epoch %s", info.name, info.id[:12], info.service_id, info.epoch
        )
        return _created(info, created=True, image_pull=pulled)

    async def _discard(self, container_id: str) -> bool:
        try:
            await self.runtime.remove(container_id, force=True)
        except ControllerError as exc:
            log.warning("could not remove container %s after a failed start: %s", container_id[:12], exc.message)
            return False
        return True

    # -- lifecycle ---------------------------------------------------------

    async def start(self, container_id: str, epoch: int | None = None) -> ActionResult:
        self.sync.check()
        return await self._act(container_id, epoch, self.runtime.start, "started", fence_own_epoch=True)

    async def restart(self, container_id: str, timeout: int, epoch: int | None = None) -> ActionResult:
        self.sync.check()
        return await self.heal(container_id, timeout, epoch)

    async def heal(self, container_id: str, timeout: int, epoch: int | None = None, *,
                   if_running: bool = False) -> ActionResult:
        """Restart in place under the service's lock, without the sync guard (the health prober's restart).
        ``if_running``: only a container still running under that lock (``ContainerNotRunning`` else), so a
        container the hub stopped since the caller looked is not started again."""

        async def restart(cid: str) -> None:
            if if_running and (await self.runtime.get_container(cid)).status != "running":
                raise ContainerNotRunning(f"container {cid[:12]} is no longer running; not restarted")
            await self.runtime.restart(cid, timeout)

        # Healing a copy that turns out stale is harmless: the next heartbeat's stop order removes it.
        return await self._act(container_id, epoch, restart, "restarted", fence_own_epoch=False)

    async def stop(self, container_id: str, timeout: int, epoch: int | None = None) -> ActionResult:
        async def stop(cid: str) -> None:
            await self.runtime.stop(cid, timeout)

        return await self._act(container_id, epoch, stop, "stopped", fence_own_epoch=False)

    async def remove(self, container_id: str, force: bool, epoch: int | None = None) -> ActionResult:
        async def remove(cid: str) -> None:
            await self.runtime.remove(cid, force)

        return await self._act(container_id, epoch, remove, "removed", fence_own_epoch=False)

    async def _act(
        self,
        container_id: str,
        epoch: int | None,
        action: Callable[[str], Awaitable[None]],
        done: str,
        *,
        fence_own_epoch: bool,
    ) -> ActionResult:
        """Run ``action`` under the service's lock after the epoch checks.

        Stopping and removing are always allowed for a stale copy (that is how
        it gets cleaned up); only an explicit older ``epoch`` is refused.
        """
        await self.seed_epochs()
        container = await self.runtime.get_container(container_id)
        async with self._lock(container.service_id):
            if container.service_id:
                if epoch is not None:
                    self._fence(container.service_id, epoch)
                # A caller that names its epoch (our hub) speaks for the service: its registry says which
                # container is current, even one older than an epoch a failed move claimed. Without one
                # (a GeoML-Hub client), a container older than the newest epoch seen is not revived.
                if fence_own_epoch and epoch is None and container.epoch is not None:
                    self._fence(container.service_id, container.epoch)
            await action(container.id)
        status = done if done == "removed" else (await self.runtime.get_container(container.id)).status
        log.info("container %s (%s) %s", container.name, container.id[:12], done)
        return ActionResult(container_id=container.id, status=status, message=f"container {container.name} {done}")

    # -- files -------------------------------------------------------------

    async def copy_file(self, container_id: str, body: FileCopy) -> CopyResult:
        # Decoding and packing megabytes is CPU work: off the event loop.
        content = await asyncio.to_thread(archives.decode_base64, body.content_base64, "content_base64")
        container = await self.runtime.get_container(container_id)
        target = await copies.file_target(self.runtime, container.id, body)
        data = await asyncio.to_thread(archives.file_archive, target, content)
        await self.runtime.put_archive(container.id, data)
        return CopyResult(
            container_id=container.id, path=target, files=1, size=len(content), message=f"copied to {target}"
        )

    async def copy_directory(self, container_id: str, body: DirectoryCopy) -> CopyResult:
        target = archives.container_path(body.container_path)
        raw = await asyncio.to_thread(archives.decode_base64, body.archive_base64, "archive_base64")
        # Unpacked before anything is removed: a bad archive must not cost the old folder.
        data, files, folders = await asyncio.to_thread(archives.directory_archive, target, raw)
        container = await self.runtime.get_container(container_id)
        if body.remove_existing and container.status != "running":
            raise ContainerNotRunning(
                "remove_existing needs the container running: the old folder is removed from inside it",
                {"status": container.status},
            )
        await copies.check_directory(
            self.runtime, container.id, target, folders, remove_existing=body.remove_existing
        )
        if body.remove_existing:
            code, output = await self.runtime.exec(container.id, ["rm", "-rf", target])
            if code != 0:
                raise CopyFailed(f"could not remove {target}: {output.strip()}", {"exit_code": code})
        await self.runtime.put_archive(container.id, data)
        return CopyResult(
            container_id=container.id, path=target, files=files, size=len(raw), message=f"copied to {target}"
        )


def _same_create(managed: list[ContainerInfo], config: ContainerCreate, job: JobParts | None) -> ContainerInfo | None:
    """The container a create with this ``(service_id, epoch)`` (a job's: its attempt) made before, if any
    (none without a service or job)."""
    if job is not None:
        return next((info for info in managed if info.labels.get(LABEL_ATTEMPT) == job.attempt_id), None)
    if not config.service_id:
        return None
    epoch = config.epoch or 0
    for info in managed:
        if info.service_id == config.service_id and info.epoch == epoch:
            return info
    return None


def _created(info: ContainerInfo, *, created: bool, image_pull: ImagePulled | None = None) -> ContainerCreated:
    return ContainerCreated(
        container_id=info.id,
        name=info.name,
        status=info.status,
        ports=info.ports,
        service_id=info.service_id,
        epoch=info.epoch,
        created=created,
        gpu_device_ids=info.gpu_device_ids,
        image_pull=image_pull,
    )
